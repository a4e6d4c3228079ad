"""A fast, deterministic fake vendor for the operations tests (graceful-upgrade load).

Answers every request with 200 and a small Stripe-shaped JSON body, keep-alive
(HTTP/1.1), one thread per connection. `GET /__stats` returns how many other requests it
answered. Binds 127.0.0.1 only.

    python3 ops_upstream.py --port 8420
"""

import argparse
import itertools
import json
import threading
from urllib.parse import parse_qs
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_counter = itertools.count(1)
_served = 0
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle plus the
    # proxy's delayed ACK would stall every response by ~40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _answer(self, status: int, body: dict, request_id: str = "") -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if request_id:
            self.send_header("Request-Id", request_id)
        self.end_headers()
        self.wfile.write(raw)

    def _handle(self) -> None:
        global _served
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/__stats":
            with _lock:
                served = _served
            self._answer(200, {"served": served})
            return
        with _lock:
            _served += 1
        n = next(_counter)
        form = parse_qs(body.decode("utf-8", "replace"))
        raw_amount = form.get("amount", ["0"])[0]
        amount = int(raw_amount) if raw_amount.isdigit() else 0
        self._answer(
            200,
            {
                "id": f"pi_ops{n:08d}",
                "object": "payment_intent",
                "amount": amount,
                "currency": form.get("currency", ["usd"])[0],
                "status": "requires_payment_method",
            },
            request_id=f"req_ops{n:08d}",
        )

    do_GET = _handle
    do_POST = _handle
    do_DELETE = _handle


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    Server(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
