"""Run localstripe (a fake, stateful Stripe) on 127.0.0.1 and record every request.

    python localstripe_server.py --port 8420 --state-dir /tmp/x

localstripe itself binds every interface and keeps its state in a hard-coded
/tmp/localstripe.pickle. This wrapper:

* binds 127.0.0.1 only, on the given port;
* keeps the pickle inside --state-dir, so parallel fakes never share state;
* appends one JSON line per request to STATE_DIR/requests.jsonl, with what the
  vendor really received (method, raw path, headers, body bytes) and what it
  answered (status, body), so tests can assert "the vendor saw the real sk_ secret",
  "the vendor received nothing", "the body arrived byte for byte";
* fills fidelity gaps of localstripe: real Stripe accepts `automatic_payment_methods`
  and `description` on a PaymentIntent, confirms with the customer's attached payment
  method when none is named (both hit by the seed's request), stores an updated
  `amount` as an integer (localstripe keeps the form's string), and has
  `POST /v1/payment_intents/{id}/increment_authorization` (a held intent's new total);
* answers `100 Continue` before the real answer when a request carries
  `x-fake-send-100: 1`, as any HTTP/1.1 server may, to test how the proxy treats an
  informational answer.
"""

import argparse
import base64
import json
import os
import socket
import sys
import time

from aiohttp import web

import localstripe.resources as resources
from localstripe import server as ls_server
from localstripe.errors import UserError


def patch_store(state_dir):
    pickle_path = os.path.join(state_dir, "localstripe.pickle")

    def try_load_from_disk(self):
        try:
            import pickle

            with open(pickle_path, "rb") as f:
                old = pickle.load(f)
                self.clear()
                self.update(old)
        except FileNotFoundError:
            pass

    def dump_to_disk(self):
        import pickle

        with open(pickle_path, "wb") as f:
            pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)

    resources.Store.try_load_from_disk = try_load_from_disk
    resources.Store.dump_to_disk = dump_to_disk


def patch_payment_intent():
    PaymentIntent = resources.PaymentIntent
    original_init = PaymentIntent.__init__
    original_create = PaymentIntent._api_create.__func__

    def __init__(self, automatic_payment_methods=None, description=None, **kwargs):
        original_init(self, **kwargs)
        self.automatic_payment_methods = automatic_payment_methods
        self.description = description

    def _api_create(cls, **data):
        confirm = resources.try_convert_to_bool(data.get("confirm"))
        customer = data.get("customer")
        if confirm is True and not data.get("payment_method") and isinstance(customer, str):
            for key, obj in list(resources.store.items()):
                if key.startswith("payment_method:") and getattr(obj, "customer", None) == customer:
                    data["payment_method"] = obj.id
                    break
        return original_create(cls, **data)

    original_update = PaymentIntent._update

    def _update(self, **data):
        if "amount" in data:
            amount = resources.try_convert_to_int(data["amount"])
            if type(amount) is not int or amount <= 0:
                raise UserError(400, "Bad request")
            data["amount"] = amount
        original_update(self, **data)

    PaymentIntent.__init__ = __init__
    PaymentIntent._api_create = classmethod(_api_create)
    PaymentIntent._update = _update


def increment_authorization(id=None, amount=None, **kwargs):
    """Stripe's increment: `amount` is the held intent's new, larger total."""
    if kwargs:
        raise UserError(400, "Received unknown parameter: " + ", ".join(kwargs))
    intent = resources.PaymentIntent._api_retrieve(id)
    amount = resources.try_convert_to_int(amount)
    if intent.status != "requires_capture" or type(amount) is not int or amount < intent.amount:
        raise UserError(400, "Bad request")
    intent.amount = amount
    return intent


def make_recorder(log_path):
    @web.middleware
    async def record(request, handler):
        body = await request.read()  # cached by aiohttp for the handlers below
        if request.headers.get("x-fake-send-100") == "1":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        status = 500
        response_body = b""
        try:
            response = await handler(request)
            status = response.status
            response_body = getattr(response, "body", b"") or b""
            if not isinstance(response_body, (bytes, bytearray)):
                response_body = b""
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except UserError as e:
            status = e.code
            raise
        finally:
            entry = {
                "ts": time.time(),
                "method": request.method,
                "path": request.raw_path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "authorization": request.headers.get("Authorization"),
                "body_b64": base64.b64encode(body).decode("ascii"),
                "status": status,
                "response_b64": base64.b64encode(bytes(response_body)).decode("ascii"),
            }
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()

    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()

    os.makedirs(args.state_dir, exist_ok=True)
    patch_store(args.state_dir)
    patch_payment_intent()
    resources.store.try_load_from_disk()

    app = ls_server.app
    url = "/v1/payment_intents/{id}/increment_authorization"
    app.router.add_route("POST", url, ls_server.api_extra(increment_authorization, url))
    # Bodies up to 64 MiB, so that an oversized body the proxy wrongly forwards is
    # recorded here instead of being refused by aiohttp's 1 MiB default.
    app._client_max_size = 64 * 1024 * 1024
    app.middlewares.insert(0, make_recorder(os.path.join(args.state_dir, "requests.jsonl")))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"localstripe listening on 127.0.0.1:{args.port}", flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    sys.exit(main())
