#!/usr/bin/env python3
"""A Python agent that charges a customer through Keybrake with the official `stripe` SDK.

Per run: issue a vault key (control API, tenant token), point the Stripe SDK at the
Keybrake proxy with the vault key as its API key, create and confirm a PaymentIntent,
revoke the key in `finally`. The Stripe secret is never in this process.

    pip install stripe requests
    export KEYBRAKE_TOKEN=kb_…                          # tenant API token
    export KEYBRAKE_API_URL=http://127.0.0.1:8081       # control API (default)
    export KEYBRAKE_PROXY_URL=http://127.0.0.1:8080     # proxy (default)
    python examples/python/agent.py --customer cus_… --amount-cents 4200 [--cap-usd 500]

Prints one JSON object on stdout. Exit status: 0 paid; 2 the payment would exceed the
key's daily cap (Keybrake's 429 cap_exhausted, raised by the SDK as a RateLimitError
carrying Keybrake's message); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from typing import Any, Optional

import requests
import stripe

API_URL = os.environ.get("KEYBRAKE_API_URL", "http://127.0.0.1:8081").rstrip("/")
PROXY_URL = os.environ.get("KEYBRAKE_PROXY_URL", "http://127.0.0.1:8080").rstrip("/")
TIMEOUT_S = 30


class SpendCapExceeded(Exception):
    """The vault key's daily cap would be exceeded; nothing reached Stripe."""

    def __init__(self, message: str, stripe_error: stripe.StripeError):
        super().__init__(message)
        self.stripe_error = stripe_error


def issue_vault_key(tenant_token: str, label: str, cap_usd: float) -> dict[str, Any]:
    r = requests.post(
        f"{API_URL}/v1/keys",
        headers={"Authorization": f"Bearer {tenant_token}"},
        json={
            "label": label,
            "vendor": "stripe",
            "allowed_endpoints": ["/v1/payment_intents", "/v1/payment_intents/*"],
            "daily_usd_cap": cap_usd,
            "expires_in": "5m",
        },
        timeout=TIMEOUT_S,
    )
    if r.status_code != 201:
        raise RuntimeError(f"key issuance failed: {r.status_code} {r.text[:500]}")
    return r.json()


def revoke_vault_key(tenant_token: str, key_id: str) -> None:
    try:
        r = requests.delete(
            f"{API_URL}/v1/keys/{key_id}",
            headers={"Authorization": f"Bearer {tenant_token}"},
            timeout=TIMEOUT_S,
        )
        if r.status_code != 200:
            print(f"revoking {key_id} failed: {r.status_code} (it expires anyway)", file=sys.stderr)
    except requests.RequestException as e:
        print(f"revoking {key_id} failed: {e} (it expires anyway)", file=sys.stderr)


def stripe_through_keybrake(vault_key: str) -> stripe.StripeClient:
    """The stock Stripe SDK; only the base address and the key differ."""
    return stripe.StripeClient(
        api_key=vault_key,
        base_addresses={"api": f"{PROXY_URL}/stripe"},
        max_network_retries=0,
    )


def error_code(e: stripe.StripeError) -> Optional[str]:
    """The `error.code` of a Stripe-shaped error body. (The SDK does not copy it onto
    `RateLimitError.code`, only onto `e.error`.)"""
    return e.error.code if e.error is not None and e.error.code else e.code


def charge(client: stripe.StripeClient, customer: str, amount_cents: int) -> stripe.PaymentIntent:
    try:
        return client.v1.payment_intents.create(
            params={
                "amount": amount_cents,
                "currency": "usd",
                "customer": customer,
                "confirm": True,
                "automatic_payment_methods": {"enabled": True},
            }
        )
    except stripe.StripeError as e:
        # Keybrake's denials are Stripe-shaped: error.code / error.message for the SDK.
        if e.http_status == 429 and error_code(e) == "cap_exhausted":
            raise SpendCapExceeded(e.user_message or str(e), e) from e
        raise


def run(customer: str, amount_cents: int, cap_usd: float, tenant_token: str) -> tuple[int, dict[str, Any]]:
    key = issue_vault_key(tenant_token, f"py-agent-{uuid.uuid4()}", cap_usd)
    out: dict[str, Any] = {"key_id": key["id"]}
    try:
        client = stripe_through_keybrake(key["token"])
        intent = charge(client, customer, amount_cents)
        out["payment_intent"] = {"id": intent.id, "status": intent.status, "amount": intent.amount}
        return 0, out
    except SpendCapExceeded as e:
        err = e.stripe_error
        out.update(
            error="spend_cap_exceeded",
            message=str(e),
            stripe_error={"class": type(err).__name__, "http_status": err.http_status, "code": error_code(err)},
        )
        return 2, out
    except stripe.StripeError as e:
        out.update(
            error="stripe_error",
            message=e.user_message or str(e),
            stripe_error={"class": type(e).__name__, "http_status": e.http_status, "code": error_code(e)},
        )
        return 1, out
    finally:
        revoke_vault_key(tenant_token, key["id"])


class UsageParser(argparse.ArgumentParser):
    """Usage errors exit 1 (argparse's own 2 means "over the cap" here)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(json.dumps({"error": "usage", "message": message}))
        raise SystemExit(1)


def main(argv: Optional[list[str]] = None) -> int:
    p = UsageParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--customer", required=True, help="Stripe customer id (cus_…)")
    p.add_argument("--amount-cents", type=int, required=True)
    p.add_argument("--cap-usd", type=float, default=500.0, help="the vault key's daily USD cap (default 500)")
    args = p.parse_args(argv)
    token = os.environ.get("KEYBRAKE_TOKEN")
    if not token:
        print(json.dumps({"error": "missing_token",
                          "message": "KEYBRAKE_TOKEN (the Keybrake tenant API token, kb_…) is not set"}))
        return 1
    try:
        code, out = run(args.customer, args.amount_cents, args.cap_usd, token)
    except (RuntimeError, requests.RequestException) as e:
        print(json.dumps({"error": "keybrake_unavailable", "message": str(e)}))
        return 1
    print(json.dumps(out))
    if code == 2:
        print(f"spend cap exceeded: {out['message']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
