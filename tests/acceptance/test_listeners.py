"""Listener limits of both planes (docs/operations.md): total header deadlines, keep-alive
idle timeout, header size bound, connection bounds, the control API's early 413, and
revocation answered while a flood of slow-header connections runs.

Slow clients are raw sockets that trickle a request header a byte at a time: each byte
is progress, so only a deadline counted in total (not per read) closes them."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import ssl
import threading
import time
from typing import Optional

import pytest
import requests

from harness import assert_denied, wait_until, write_config

PARTIAL = b"GET /stripe/v1/customers HTTP/1.1\r\nHost: x\r\nX-Slow: "


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def watch_close(sock: socket.socket, seconds: float, trickle: bytes = b"", interval: float = 0.25):
    """Send `trickle` one byte per `interval` while watching the socket.

    Returns (seconds until the server closed it, bytes received), or (None, bytes) if it
    was still open after `seconds`."""
    start = time.monotonic()
    received = b""
    sent = 0
    while time.monotonic() - start < seconds:
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                return time.monotonic() - start, received
            if not chunk:
                return time.monotonic() - start, received
            received += chunk
            continue
        if sent < len(trickle):
            try:
                sock.send(trickle[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start, received
            sent += 1
    return None, received


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


# --------------------------------------------------------------------------- proxy


def refused_at_the_listener(kb, code: str) -> float:
    """`keybrake_requests_total` for `code` under vendor `unknown`: requests the proxy's
    listener refused before their path was read (0 when never counted)."""
    series = f'keybrake_requests_total{{decision="{code}",vendor="unknown"}} '
    text = requests.get(f"{kb.metrics_url}/metrics", timeout=5).text
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(series)), 0.0)


def test_proxy_header_deadline_is_counted_in_total_on_a_fresh_connection(keybrake_factory, fake_stripe, tmp_path):
    """A byte every 250 ms is progress on every read, yet the header is late after
    header_timeout_ms: 408 header_timeout, closed (Pingora alone waits 60 s per read)."""
    config = write_config(tmp_path / "conf", proxy={"header_timeout_ms": 1500})
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    s = connect(kb.proxy_port)
    s.sendall(PARTIAL)
    closed, received = watch_close(s, 6, trickle=b"a" * 100)
    assert closed is not None, "a header trickled for 6 s was still being read"
    assert 1.2 < closed < 3.5, f"closed after {closed:.1f} s"
    status, body = status_and_json(received)
    assert (status, body["code"]) == (408, "header_timeout"), received
    # Counted where an operator looks, though no vendor or path was read.
    assert refused_at_the_listener(kb, "header_timeout") == 1
    # A client that sends its header at once is served as before.
    assert_denied(kb.proxy("GET", "/stripe/v1/customers"), 401, "missing_key")


def test_a_kept_alive_proxy_connection_has_an_idle_timeout_and_a_header_deadline(keybrake_factory, fake_stripe, tmp_path):
    """After one answered request (a 401 needs no key) the connection waits at most
    keepalive_timeout_ms for the next request, whose header then has header_timeout_ms."""
    config = write_config(tmp_path / "conf", proxy={"header_timeout_ms": 1500, "keepalive_timeout_ms": 1000})
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    request = b"GET /stripe/v1/customers HTTP/1.1\r\nHost: x\r\n\r\n"

    idle = connect(kb.proxy_port)
    idle.sendall(request)
    assert status_and_json(read_response(idle))[0] == 401
    closed, received = watch_close(idle, 6)
    assert closed is not None and 0.7 < closed < 2.5, f"idle kept-alive connection: {closed}"
    assert received == b"", "an idle connection is closed without an answer"

    trickling = connect(kb.proxy_port)
    trickling.sendall(request)
    assert status_and_json(read_response(trickling))[0] == 401
    closed, received = watch_close(trickling, 8, trickle=PARTIAL + b"a" * 100)
    # First byte at once, then header_timeout: however steady the trickle.
    assert closed is not None and 1.2 < closed < 3.5, f"trickling kept-alive connection: {closed}"
    assert status_and_json(received)[1]["code"] == "header_timeout"

    # Keep-alive itself still works: two requests on one connection within the timeout.
    with requests.Session() as session:
        for _ in range(2):
            r = session.get(f"{kb.proxy_url}/stripe/v1/customers", timeout=5)
            assert r.status_code == 401
            time.sleep(0.3)


def test_a_proxy_request_header_over_the_bound_is_refused_with_431(keybrake_factory, fake_stripe, tmp_path):
    config = write_config(tmp_path / "conf", proxy={"max_header_bytes": 8192})
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    # Under the bound: served (here: refused for want of a key, by the proxy itself).
    r = kb.proxy("GET", "/stripe/v1/customers", headers={"X-Pad": "a" * 7000})
    assert_denied(r, 401, "missing_key")
    # Over it: 431 before anything else, with the denial shape of SPEC §4.
    r = kb.proxy("GET", "/stripe/v1/customers", headers={"X-Pad": "a" * 20000})
    assert_denied(r, 431, "headers_too_large")
    # More fields than are parsed (256), however small: the same 431, not a bare 400.
    many = {f"x-f{i}": "v" for i in range(300)}
    assert_denied(kb.proxy("GET", "/stripe/v1/customers", headers=many), 431, "headers_too_large")
    few = {f"x-f{i}": "v" for i in range(250)}
    assert_denied(kb.proxy("GET", "/stripe/v1/customers", headers=few), 401, "missing_key")
    assert refused_at_the_listener(kb, "headers_too_large") == 2
    # A never-finished header stops being read at the bound (it held ~1 MB per connection).
    s = connect(kb.proxy_port)
    s.sendall(PARTIAL)
    try:
        for _ in range(64):
            s.sendall(b"a" * 1024)
    except (BrokenPipeError, ConnectionResetError):
        pass
    closed, received = watch_close(s, 5)
    assert closed is not None, "the connection was kept past the header bound"
    assert received.startswith(b"HTTP/1.1 431"), received[:100]
    assert not fake_stripe.received()


def test_a_tls_client_on_the_plain_proxy_port_is_closed_at_once(keybrake, fake_stripe):
    """An https:// client pointed at a plain-HTTP proxy: closed at once (it fails with a
    TLS error), not after the 10 s header deadline with a plain-text 408 it cannot read."""
    s = connect(keybrake.proxy_port)
    context = ssl.create_default_context()
    started = time.monotonic()
    try:
        context.wrap_socket(s, server_hostname="localhost")
    except (OSError, ssl.SSLError):
        pass
    assert time.monotonic() - started < 2
    s.close()
    assert not fake_stripe.received()


def test_proxy_connections_are_bounded_and_a_new_client_still_gets_in(keybrake_factory, fake_stripe, tmp_path):
    """max_connections: 20 and 40 connections trickling headers: at most 20 stay open (the
    oldest make room), and a client that sends its request at once is answered at once."""
    config = write_config(tmp_path / "conf", proxy={"max_connections": 20, "header_timeout_ms": 30000})
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    slow = []
    for _ in range(40):
        s = connect(kb.proxy_port)
        s.sendall(PARTIAL)
        slow.append(s)
        time.sleep(0.01)
    time.sleep(0.5)
    started = time.monotonic()
    r = kb.proxy("GET", "/stripe/v1/customers", timeout=5)
    assert_denied(r, 401, "missing_key")
    assert time.monotonic() - started < 1.0

    def open_ones() -> list[int]:
        alive = []
        for i, s in enumerate(slow):
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                try:
                    if s.recv(1024) == b"":
                        continue
                except ConnectionResetError:
                    continue
            alive.append(i)
        return alive

    alive = open_ones()
    assert len(alive) <= 20, f"{len(alive)} connections open, bound 20"
    assert alive and min(alive) >= 19, f"the oldest waiting connections make room, open: {alive}"
    # The operator sees it: connections evicted to make room, and how many are open.
    metrics = requests.get(f"{kb.metrics_url}/metrics", timeout=5).text
    value = lambda name: float(next(line.split()[-1] for line in metrics.splitlines()
                                    if line.startswith(name + '{listener="proxy"}')))
    assert value("keybrake_connections_evicted_total") >= 20, metrics
    assert value("keybrake_connections_open") <= 20
    for s in slow:
        s.close()


def _big_vendor(size: int):
    """A vendor answering every request with `size` bytes of JSON-ish body; returns (url,
    server)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Big(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            try:
                self.wfile.write(b" " * size)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Big)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_a_client_that_stops_reading_its_response_is_disconnected_and_its_place_freed(
        keybrake_factory, stripe_secret, tmp_path):
    """max_connections: 1 and write_timeout_ms: 1000: a client asks for a 64 MiB response
    and never reads it. Its connection is closed once a write to it has waited a second,
    so a next client gets in (without the timeout it would hold the only place for ever)."""
    url, server = _big_vendor(64 << 20)
    config = write_config(tmp_path / "conf", proxy={"max_connections": 1, "write_timeout_ms": 1000})
    kb = keybrake_factory({"stripe": url}, config=config)
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    key = t.issue_key(allowed_endpoints=["GET /v1/customers"])
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", kb.proxy_port))
    stuck.sendall(b"GET /stripe/v1/customers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + key["token"].encode() + b"\r\n\r\n")
    time.sleep(2)  # the vendor's answer fills the socket buffers; a write then waits

    def next_client():
        try:
            return [kb.proxy("GET", "/stripe/v1/charges", timeout=3)]  # a 401 is falsy itself
        except requests.RequestException:
            return None

    try:
        answered = wait_until(next_client, timeout=20, interval=0.5)
        assert answered, "the stuck client's place was never freed"
        assert_denied(answered[0], 401, "missing_key")
    finally:
        stuck.close()
        server.shutdown()


# --------------------------------------------------------------------------- control API


def test_control_header_deadline_is_counted_in_total(keybrake_factory, fake_stripe, tmp_path):
    """One byte every 250 ms kept an idle timer alive for ever; the header deadline is total."""
    config = write_config(tmp_path / "conf", control={"header_timeout_ms": 1000})
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    s = connect(kb.control_port)
    s.sendall(b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    closed, _ = watch_close(s, 6, trickle=b"a" * 100)
    assert closed is not None and 0.7 < closed < 3.0, f"closed after {closed}"


def test_control_answers_413_on_a_declared_content_length_over_the_limit_without_reading_it(keybrake, tmp_path):
    s = connect(keybrake.control_port)
    started = time.monotonic()
    s.sendall(
        b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer kb_nothing\r\nContent-Length: 10000000\r\n\r\n{"
    )
    response = read_response(s)
    assert time.monotonic() - started < 1.0
    status, body = status_and_json(response)
    assert (status, body["error"]["code"]) == (413, "body_too_large"), response
    s.close()


def test_control_connections_per_client_are_bounded(keybrake_factory, fake_stripe, tmp_path):
    """max_connections_per_client: 5 and 10 slow connections from 127.0.0.2: its 5 oldest
    are closed, while 127.0.0.1 is served."""
    config = write_config(tmp_path / "conf", control={"max_connections_per_client": 5, "header_timeout_ms": 30000})
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    slow = []
    for _ in range(10):
        s = connect(kb.control_port, source="127.0.0.2")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(s)
        time.sleep(0.02)
    time.sleep(0.3)
    closed = [i for i, s in enumerate(slow) if watch_close(s, 0.05)[0] is not None]
    assert closed == [0, 1, 2, 3, 4], closed
    assert requests.get(f"{kb.control_url}/healthz", timeout=2).status_code == 200
    for s in slow:
        s.close()


class Flood:
    """`n` connections to `port` from the given loopback sources, each sending `request`
    (by default a partial request header) and then `trickle` every `interval` s (nothing
    if empty); a connection the server closes is opened again at once, as an attacker
    would."""

    def __init__(
        self,
        port: int,
        n: int,
        sources: list[str],
        interval: float = 1.0,
        request: bytes = b"DELETE /v1/keys/key_x HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        trickle: bytes = b"a",
    ):
        self.port, self.n, self.sources, self.interval = port, n, sources, interval
        self.request, self.trickle = request, trickle
        self.open = 0
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self, i: int) -> None:
        source = self.sources[i % len(self.sources)]
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.open += 1
            try:
                writer.write(self.request)
                await writer.drain()
                while not self._stop.is_set():
                    try:
                        data = await asyncio.wait_for(reader.read(1024), self.interval)
                        if not data:
                            break
                    except asyncio.TimeoutError:
                        if self.trickle:
                            writer.write(self.trickle)
                            await writer.drain()
            except OSError:
                pass
            finally:
                self.open -= 1
                writer.close()
            self.reopened += 1

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._one(i)) for i in range(self.n)]
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> "Flood":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def timed(call) -> tuple[float, requests.Response]:
    started = time.monotonic()
    r = call()
    return time.monotonic() - started, r


def test_revocation_health_and_readiness_answer_within_a_second_during_a_slow_header_flood(keybrake, tenant):
    """SPEC §6 revocation must stay reachable: 1,100 connections trickling headers, from
    20 addresses (more than the 1,024 open connections allowed), reopened when closed.
    DELETE /v1/keys/{id}, /healthz and /readyz still answer within 1 s each, and the
    revoked key is refused by the proxy."""
    kb = keybrake
    keys = [tenant.issue_key(allowed_endpoints=["GET /v1/customers"]) for _ in range(3)]
    sources = [f"127.0.0.{i}" for i in range(2, 22)]
    with Flood(kb.control_port, 1100, sources) as flood:
        deadline = time.monotonic() + 15
        while flood.open < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flood.open >= 1000, f"only {flood.open} flood connections opened"
        time.sleep(1.0)
        for key in keys:
            took, r = timed(lambda: kb.control("DELETE", f"/v1/keys/{key['id']}", token=tenant.token, timeout=5))
            assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
            assert took < 1.0, f"revocation took {took:.2f} s during the flood"
            for path in ("/healthz", "/readyz"):
                took, r = timed(lambda: requests.get(f"{kb.control_url}{path}", timeout=5))
                assert r.status_code == 200, (path, r.text)
                assert took < 1.0, f"{path} took {took:.2f} s during the flood"
            r = kb.proxy("GET", "/stripe/v1/customers", key=key["token"])
            assert_denied(r, 401, "key_revoked")
            time.sleep(1.5)
        assert flood.reopened > 0, "the flood was never cut back"


def test_a_revocation_waits_for_a_place_when_every_control_connection_is_busy(tmp_path, fake_stripe, stripe_secret):
    """Every place of the revoking client's address held by requests being served (here
    max_connections_per_client: 4 and four node long-polls, each answered after 1.5 s and
    sent again at once, as a flood of valid requests would): the revocation's connection is
    not closed at once, it waits for the first of them to finish and is answered."""
    from fleet import ControlPlane

    config = write_config(tmp_path / "conf", control={"max_connections_per_client": 4, "header_timeout_ms": 5000})
    control = ControlPlane(tmp_path / "control", {"stripe": fake_stripe.url}, config=config)
    control.start()
    stop = threading.Event()
    polls: list[int] = []
    try:
        tenant = control.create_tenant("acme")
        tenant.put_credential("stripe", stripe_secret)
        key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
        token = control.create_node("poller")["node_token"]
        url = f"{control.control_url}/v1/sync/snapshot"

        holding = threading.Barrier(5)

        def poller(i: int) -> None:
            session = requests.Session()
            headers = {"authorization": f"Bearer {token}", "keybrake-node-session": f"s_poller{i}"}
            at = session.get(url, params={"since": 0, "wait_ms": 0}, headers=headers, timeout=10).json()
            holding.wait(timeout=10)
            while not stop.is_set():
                params = {"epoch": at["epoch"], "since": at["version"], "wait_ms": 1500}
                try:
                    r = session.get(url, params=params, headers=headers, timeout=10)
                except requests.ConnectionError:
                    continue  # its connection made room for the revocation's, closed after its answer
                polls.append(r.status_code)
                if r.status_code == 200:
                    at = r.json()

        threads = [threading.Thread(target=poller, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        holding.wait(timeout=10)
        time.sleep(0.5)  # the four places held, each by a poll being served (1.5 s each)
        took, r = timed(lambda: control.control("DELETE", f"/v1/keys/{key['id']}", token=tenant.token, timeout=10))
        assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
        assert 0.2 < took < 3.0, f"the revocation took {took:.2f} s (it should have waited for a poll to end)"
        stop.set()
        for t in threads:
            t.join(timeout=10)
        assert tenant.get_key(key["id"])["status"] == "revoked"
        assert polls and all(code == 200 for code in polls), polls
    finally:
        stop.set()
        control.stop()


@pytest.mark.parametrize(
    "flood_sources, flood_size, limits, bound",
    [
        # 300 connections from 6 other addresses against a total bound of 200.
        ([f"127.0.0.{i}" for i in range(2, 8)], 300, {"max_connections": 200}, 200),
        # 100 connections from the revoking client's own address (its bound: 64).
        (["127.0.0.1"], 100, {}, 64),
    ],
    ids=["total-bound", "own-address-bound"],
)
def test_revocation_is_answered_during_a_flood_of_stalled_bodies_with_a_valid_token(
    keybrake_factory, fake_stripe, stripe_secret, tmp_path, flood_sources, flood_size, limits, bound
):
    """Connections that send `POST /v1/keys` with another tenant's valid token and
    `Content-Length: 60000`, then one byte of body and nothing more, fill the connection
    bound: a body still being read makes room like a header still being read does, so
    DELETE /v1/keys/{id} answers 200 within 2 s and the key is revoked."""
    config = write_config(tmp_path / "conf", control=limits)
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    victim = kb.create_tenant("victim")
    victim.put_credential("stripe", stripe_secret)
    keys = [victim.issue_key(allowed_endpoints=["GET /v1/customers"]) for _ in range(2)]
    attacker = kb.create_tenant("attacker")
    stall = (
        b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + attacker.token.encode() + b"\r\nContent-Length: 60000\r\n\r\n{"
    )
    with Flood(kb.control_port, flood_size, flood_sources, request=stall, trickle=b"") as flood:
        deadline = time.monotonic() + 15
        while flood.open < bound and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flood.open >= bound, f"only {flood.open} flood connections opened"
        time.sleep(1.0)
        for key in keys:
            started = time.monotonic()
            try:
                r = kb.control("DELETE", f"/v1/keys/{key['id']}", token=victim.token, timeout=5)
            except requests.RequestException as e:
                pytest.fail(f"DELETE /v1/keys/{{id}} unanswered during the flood: {e!r}")
            took = time.monotonic() - started
            assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
            assert took < 2.0, f"revocation took {took:.2f} s during the flood"
            time.sleep(1.0)
        assert flood.reopened > 0, "the flood was never cut back"
    for key in keys:
        assert victim.get_key(key["id"])["status"] == "revoked"
        assert_denied(kb.proxy("GET", "/stripe/v1/customers", key=key["token"]), 401, "key_revoked")


def test_a_port_already_taken_is_named_and_the_process_exits(tmp_path, fake_stripe):
    """A port another program (or another keybrake) listens on: `serve` and `control`
    say which listener cannot bind and exit non-zero, instead of Pingora retrying it
    forever while /readyz answers 200, or two control planes sharing one port through
    SO_REUSEPORT."""
    import subprocess

    from fleet import ControlPlane
    from harness import Keybrake

    serve = Keybrake(tmp_path / "serve", {"stripe": fake_stripe.url})
    control = ControlPlane(tmp_path / "control", {"stripe": fake_stripe.url})
    for kb, port, what in ((serve, serve.proxy_port, "proxy"), (serve, serve.metrics_port, "metrics"),
                           (control, control.control_port, "control API")):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen(1)
            kb.workdir.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(kb.command(), env=kb.environment(), cwd=kb.workdir,
                               capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, r.stderr[-2000:]
        assert f"cannot listen on 127.0.0.1:{port} ({what})" in r.stderr, r.stderr[-2000:]
    # Two control planes on one port: the second one refuses.
    control.start()
    try:
        second = ControlPlane(tmp_path / "second", {"stripe": fake_stripe.url})
        second.control_port = control.control_port
        second.workdir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(second.command(), env=second.environment(), cwd=second.workdir,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert f"cannot listen on 127.0.0.1:{control.control_port} (control API)" in r.stderr, r.stderr[-2000:]
    finally:
        control.stop()
