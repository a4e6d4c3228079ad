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
  informational answer;
* replays the first 2xx or 5xx answer to a request carrying the same `Idempotency-Key`
  (and credential) without acting again, with `Idempotent-Replayed: true`, as Stripe does;
* with `x-fake-delay-ms: N`, waits N ms before processing; with `x-fake-status: 500`, processes the request and then answers 500 (an unknown
  outcome to the caller); with `metadata[fake_drop]=once` in the body, processes it and
  then drops the connection without an answer (the retry, with the same
  `Idempotency-Key`, gets the replay);
* has minimal `POST /v1/transfers`, `POST /v1/prices`, `GET /v1/prices/{id}`,
  `POST /v1/subscriptions` with `items[i][price]`, and one-off invoices
  (`POST /v1/invoices` of a customer's pending invoice items, `GET` and `/pay`):
  localstripe has no transfers or prices, and invoices only for subscriptions.
"""

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import secrets
import time
from urllib.parse import parse_qsl

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


def make_fidelity():
    replays = {}
    prices = {}
    invoices = {}

    def stripe_error(status, message):
        return web.json_response({"error": {"type": "invalid_request_error", "message": message}}, status=status)

    def new_id(prefix):
        return prefix + secrets.token_hex(8)

    async def extra_routes(request, form):
        path = request.path
        if request.method == "POST" and path == "/v1/transfers":
            amount = resources.try_convert_to_int(form.get("amount"))
            if type(amount) is not int or amount <= 0 or not form.get("currency") or not form.get("destination"):
                return stripe_error(400, "Bad request")
            return web.json_response({"id": new_id("tr_"), "object": "transfer", "amount": amount,
                                      "currency": form["currency"], "destination": form["destination"]})
        if request.method == "POST" and path == "/v1/prices":
            amount = resources.try_convert_to_int(form.get("unit_amount"))
            if type(amount) is not int or amount < 0 or not form.get("currency"):
                return stripe_error(400, "Bad request")
            price = {"id": new_id("price_"), "object": "price", "unit_amount": amount,
                     "currency": form["currency"], "recurring": {"interval": "month"}}
            prices[price["id"]] = price
            return web.json_response(price)
        if request.method == "GET" and path.startswith("/v1/prices/"):
            price = prices.get(path.rsplit("/", 1)[1])
            return web.json_response(price) if price else stripe_error(404, "No such price")
        if request.method == "POST" and path == "/v1/subscriptions" and "items[0][price]" in form:
            items = []
            for i in range(20):
                price = prices.get(form.get(f"items[{i}][price]", ""))
                if f"items[{i}][price]" not in form:
                    break
                if price is None:
                    return stripe_error(404, "No such price")
                items.append({"price": price, "quantity": int(form.get(f"items[{i}][quantity]", "1"))})
            return web.json_response({"id": new_id("sub_"), "object": "subscription", "status": "active",
                                      "customer": form.get("customer"), "items": {"data": items}})
        if request.method == "POST" and path == "/v1/invoices" and "subscription" not in form:
            pending = [ii for ii in resources.InvoiceItem._api_list_all(
                None, customer=form.get("customer"), limit=99)._list if ii.invoice is None]
            if not pending:
                return stripe_error(400, "Nothing to invoice")
            invoice = {"id": new_id("in_"), "object": "invoice", "customer": form["customer"],
                       "amount_due": sum(ii.amount for ii in pending), "amount_paid": 0,
                       "amount_remaining": sum(ii.amount for ii in pending),
                       "currency": pending[0].currency, "status": "open"}
            for ii in pending:
                ii.invoice = invoice["id"]
            invoices[invoice["id"]] = invoice
            return web.json_response(invoice)
        parts = path.split("/")
        if len(parts) >= 4 and parts[2] == "invoices" and parts[3] in invoices:
            invoice = invoices[parts[3]]
            if request.method == "GET" and len(parts) == 4:
                return web.json_response(invoice)
            if request.method == "POST" and parts[4:] == ["pay"]:
                if invoice["status"] == "paid":
                    return stripe_error(400, "Invoice is already paid")
                invoice.update(status="paid", amount_paid=invoice["amount_due"], amount_remaining=0)
                return web.json_response(invoice)
        return None

    def replay(replay_key):
        status, raw = replays[replay_key]
        return web.Response(body=raw, status=status, content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})

    @web.middleware
    async def fidelity(request, handler):
        body = await request.read()
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        idem = request.headers.get("Idempotency-Key")
        replay_key = (request.headers.get("Authorization"), idem) if idem else None
        if replay_key in replays:
            return replay(replay_key)
        if request.headers.get("x-fake-delay-ms"):
            await asyncio.sleep(int(request.headers["x-fake-delay-ms"]) / 1000)
            if replay_key in replays:  # a duplicate that waited for the first
                return replay(replay_key)
        response = await extra_routes(request, form)
        if response is None:
            response = await handler(request)
        if request.headers.get("x-fake-status"):
            response = stripe_error(int(request.headers["x-fake-status"]), "An unknown error occurred")
        if replay_key and (200 <= response.status < 300 or response.status >= 500):
            replays[replay_key] = (response.status, bytes(getattr(response, "body", b"") or b""))
        if form.get("metadata[fake_drop]") == "once":
            # Processed, then no answer: the connection is dropped. Only the first time.
            request.transport.abort()
        return response

    return fidelity


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
    app.middlewares.insert(0, make_fidelity())
    app.middlewares.insert(0, make_recorder(os.path.join(args.state_dir, "requests.jsonl")))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"localstripe listening on 127.0.0.1:{args.port}", flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    sys.exit(main())
