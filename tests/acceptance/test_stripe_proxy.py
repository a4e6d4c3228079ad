"""Data plane (SPEC §2, §4, §5) with Stripe: the official stripe SDK as the agent,
`keybrake serve` as the proxy, localstripe as the vendor. Every denial must be decided
by Keybrake without the vendor ever seeing the request."""

import hashlib
import hmac
import http.client
import http.server
import json
import random
import re
import secrets
import socket
import threading
import urllib.parse
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_CEILING, Decimal

import pytest
import requests
import stripe
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness import (
    as_json,
    assert_denied,
    b64url_decode,
    b64url_encode,
    currency_rate,
    denial,
    error_code,
    free_port,
    jwks,
    make_token,
    parse_ts,
    stripe_client,
    token_parts,
    read_head,
    wait_until,
    write_config,
)
from fleet import ConfirmChargesMore, JsonVendor, start_vendor

CARD = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}
PI = "/stripe/v1/payment_intents"


def pay(kb, token, amount, currency="usd", **extra):
    """POST /v1/payment_intents through the proxy, form-encoded like Stripe's SDKs."""
    return kb.proxy("POST", PI, key=token, data={"amount": amount, "currency": currency, **extra})


def accepted_intents(fake):
    return [r for r in fake.received_matching("POST", "/v1/payment_intents") if r.status == 200]


def assert_vendor_saw_only_the_real_secret(fake, secret, tokens):
    received = fake.received()
    assert received, "the fake vendor received nothing"
    for r in received:
        assert r.authorization == f"Bearer {secret}", r.authorization
        blob = json.dumps(r.headers) + r.body.decode("latin-1")
        assert "vk_" not in blob, f"a vault key reached the vendor: {r.method} {r.path}"
        for t in tokens:
            assert t not in blob and t[3:] not in blob
        assert "x-api-key" not in r.headers


# --------------------------------------------------------------------------- happy path


def test_payment_through_the_proxy_with_the_stripe_sdk(keybrake, tenant, fake_stripe, stripe_secret):
    """(1) An agent using the stripe SDK with a vault key creates a PaymentMethod and a
    confirmed PaymentIntent through Keybrake: it succeeds; Stripe sees the real sk_
    secret and never the vault key; responses carry x-keybrake-key-id; spend is $20."""
    key = tenant.issue_key(
        allowed_endpoints=["POST /v1/payment_methods", "/v1/payment_intents", "/v1/payment_intents/*"],
        daily_usd_cap=500,
    )
    client = stripe_client(keybrake, key["token"])
    pm = client.v1.payment_methods.create(params={"type": "card", "card": CARD})
    assert pm.id.startswith("pm_")
    intent = client.v1.payment_intents.create(
        params={"amount": 2000, "currency": "usd", "payment_method": pm.id, "confirm": True}
    )
    assert intent.status == "succeeded"
    assert intent.amount == 2000
    assert intent.last_response.headers.get("x-keybrake-key-id") == key["id"]
    fetched = client.v1.payment_intents.retrieve(intent.id)
    assert fetched.status == "succeeded"

    assert [r.path for r in fake_stripe.received()] == [
        "/v1/payment_methods",
        "/v1/payment_intents",
        f"/v1/payment_intents/{intent.id}",
    ]
    assert_vendor_saw_only_the_real_secret(fake_stripe, stripe_secret, [key["token"]])
    tenant.wait_spent(key["id"], Decimal(20))


def test_vault_key_is_accepted_from_x_api_key_and_basic_auth(keybrake, tenant, fake_stripe, stripe_secret):
    """The vault key works as Authorization: Bearer, x-api-key, or HTTP Basic user name;
    every client credential is removed and only the real secret is forwarded."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"])
    token = key["token"]
    url = f"{keybrake.proxy_url}/stripe/v1/customers"
    responses = [
        requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10),
        requests.get(url, headers={"x-api-key": token}, timeout=10),
        requests.get(url, auth=(token, ""), timeout=10),
        requests.get(url, headers={"Authorization": f"Bearer {token}", "x-api-key": token,
                                   "Proxy-Authorization": f"Bearer {token}", "Cookie": f"k={token}"}, timeout=10),
    ]
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.headers.get("x-keybrake-key-id") == key["id"]
    assert len(fake_stripe.received()) == 4
    assert_vendor_saw_only_the_real_secret(fake_stripe, stripe_secret, [token])
    for r in fake_stripe.received():
        assert "cookie" not in r.headers and "proxy-authorization" not in r.headers


def test_a_vault_key_anywhere_else_in_the_request_is_refused_and_never_forwarded(
        keybrake, tenant, fake_stripe):
    """The key is read from Authorization, x-api-key or Basic only (SPEC §4), and those
    are removed. A client that also puts it in the query string, the path or another
    header (an SDK's `x-goog-api-key`, a cookie) would hand it to the vendor and its
    request logs: refused with 401 `invalid_key` naming where it was, nothing sent."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers", "GET /v1/customers/*"])
    token = key["token"]
    url = f"{keybrake.proxy_url}/stripe/v1/customers"
    auth = {"Authorization": f"Bearer {token}"}
    for r, place in [
        (requests.get(f"{url}?api_key={token}", headers=auth, timeout=10), "the query string"),
        (requests.get(f"{url}?key={token.replace('_', '%5F', 1)}", headers=auth, timeout=10),
         "the query string"),
        (requests.get(url, headers={**auth, "x-goog-api-key": token}, timeout=10),
         "header x-goog-api-key"),
        (requests.get(f"{url}/{token}", headers=auth, timeout=10), "the path"),
        # Escaped: the path is forwarded decoded; a query value behind an escape.
        (requests.get(f"{url}/%76{token[1:]}", headers=auth, timeout=10), "the path"),
        (requests.get(f"{url}?auth=Bearer%20{token}", headers=auth, timeout=10), "the query string"),
        # The key without its prefix, or behind another spelling of it: found by its signature.
        (requests.get(f"{url}/{token[3:]}", headers=auth, timeout=10), "the path"),
        (requests.get(url, headers={**auth, "x-foo": f"VK_{token[3:]}"}, timeout=10), "header x-foo"),
    ]:
        assert_denied(r, 401, "invalid_key")
        assert f"found in {place}" in r.json()["message"], r.text
        assert token not in r.text
    assert fake_stripe.received() == []
    # The same request without the stray copy goes through.
    assert requests.get(f"{url}?limit=1", headers=auth, timeout=10).status_code == 200
    assert token not in keybrake.logs()


def test_query_string_is_forwarded(keybrake, tenant, fake_stripe):
    """{METHOD} /stripe/{rest}?{query} reaches the vendor as /{rest}?{query}."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"])
    r = keybrake.proxy("GET", "/stripe/v1/customers?limit=3&email=a%40b.example", key=key["token"])
    assert r.status_code == 200, r.text
    assert fake_stripe.received()[-1].path == "/v1/customers?limit=3&email=a%40b.example"


# --------------------------------------------------------------------------- caps


def test_spend_cap_refuses_the_payment_that_would_exceed_it(keybrake, tenant, fake_stripe):
    """(2) With a $20 cap: a $15 payment succeeds; the next $15 is 429 cap_exhausted, the
    SDK raises an error carrying Keybrake's message, and Stripe never sees it; $5 (exactly
    up to the cap) still succeeds, then even $0.01 is refused."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=20)
    client = stripe_client(keybrake, key["token"])
    first = client.v1.payment_intents.create(params={"amount": 1500, "currency": "usd"})
    assert first.amount == 1500

    with pytest.raises(stripe.StripeError) as info:
        client.v1.payment_intents.create(params={"amount": 1500, "currency": "usd"})
    err = info.value
    assert err.http_status == 429
    body = err.json_body
    assert body["code"] == "cap_exhausted" and body["error"]["code"] == "cap_exhausted"
    assert body["error"]["type"] == "keybrake_error"
    assert body["budget"] == "key", body
    assert err.user_message == body["error"]["message"] == body["message"]
    assert len(fake_stripe.received_matching("POST", "/v1/payment_intents")) == 1

    raw = pay(keybrake, key["token"], 1500)
    assert assert_denied(raw, 429, "cap_exhausted")["budget"] == "key"
    assert len(fake_stripe.received_matching("POST", "/v1/payment_intents")) == 1

    assert pay(keybrake, key["token"], 500).status_code == 200
    assert_denied(pay(keybrake, key["token"], 1), 429, "cap_exhausted")
    assert len(accepted_intents(fake_stripe)) == 2
    tenant.wait_spent(key["id"], Decimal(20))


def test_concurrent_payments_never_exceed_the_cap(keybrake, tenant, fake_stripe):
    """(3) 200 concurrent $1 payments against a $50 cap: exactly 50 reach Stripe and
    succeed, the other 150 are 429 cap_exhausted."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=50)
    n = 200
    barrier = threading.Barrier(n, timeout=60)

    def fire(_):
        barrier.wait()
        try:
            r = pay(keybrake, key["token"], 100)
            return r.status_code, error_code(r) if r.status_code != 200 else None
        except requests.RequestException as e:
            return "error", repr(e)

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(fire, range(n)))

    ok = [r for r in results if r[0] == 200]
    capped = [r for r in results if r == (429, "cap_exhausted")]
    others = [r for r in results if r[0] not in (200, 429)]
    assert not others, others[:5]
    assert len(ok) == 50, f"{len(ok)} succeeded"
    assert len(capped) == 150
    time.sleep(0.5)
    seen = fake_stripe.received_matching("POST", "/v1/payment_intents")
    assert len(seen) == 50 and all(r.status == 200 for r in seen)
    tenant.wait_spent(key["id"], Decimal(50))


def test_kill_9_mid_burst_never_loses_or_overspends_budget(keybrake, tenant, fake_stripe):
    """(8) keybrake serve is SIGKILLed in the middle of a burst of $1 payments; restarted
    on the same data dir, the key's spent_today_usd covers at least every payment Stripe
    accepted, and spending on until 429 never takes Stripe's total above the $40 cap."""
    cap = 40
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=cap)
    stop = threading.Event()

    def worker():
        for _ in range(40):
            if stop.is_set():
                return
            try:
                pay(keybrake, key["token"], 100)
            except requests.RequestException:
                return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    reached = wait_until(lambda: len(accepted_intents(fake_stripe)) >= cap // 2 - 2, timeout=60, interval=0.02)
    keybrake.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert reached, "the burst did not reach half the cap before the kill"
    time.sleep(0.5)
    accepted_before = len(accepted_intents(fake_stripe))
    assert accepted_before < cap, "the whole cap was spent before the kill; the test proves nothing"

    keybrake.start()
    spent = tenant.get_key(key["id"])["spent_today_usd"]
    assert spent >= accepted_before, f"spent_today_usd {spent} < {accepted_before} accepted by Stripe"
    # What a crash may cost: the unused part of the lease (a refill is 1/16 of the cap
    # rounded up to whole $1 charges, $3) and the 4 reservations in flight ($1 each),
    # never the whole cap.
    lost_at_most = Decimal(-(-cap // 16)) + 4
    assert spent <= accepted_before + lost_at_most, (
        f"after the restart ${spent} counts as spent for ${accepted_before} accepted: "
        f"more than the unused lease and the calls in flight")

    last = None
    for _ in range(cap + 5):
        last = pay(keybrake, key["token"], 100)
        if last.status_code != 200:
            break
    assert_denied(last, 429, "cap_exhausted")
    total = len(accepted_intents(fake_stripe))
    print(f"kill -9 after {accepted_before} accepted; spent after restart {spent}; total accepted {total}")
    assert total <= cap, f"Stripe accepted ${total} against a ${cap} cap"
    assert total >= cap - lost_at_most, f"only ${total} of the ${cap} cap could be spent after the crash"
    assert tenant.get_key(key["id"])["spent_today_usd"] >= total


# A padding field that takes a body past Pingora's 64 KiB replay buffer: such a body
# goes upstream through Keybrake's own exchange, which must settle and fail the same way.
LARGE = {"metadata[pad]": "p" * 100_000}


@pytest.mark.parametrize("extra", [{}, LARGE], ids=["small", "large"])
def test_vendor_error_releases_the_reservation(keybrake, tenant, fake_stripe, extra):
    """A payment Stripe refuses (4xx) is answered with Stripe's own status and JSON, and
    its reserved amount goes back to the key: nothing counts as spent."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=20)
    r = pay(keybrake, key["token"], 1500, customer="cus_doesnotexist", **extra)
    assert r.status_code == 404, r.text
    vendor = fake_stripe.received()[-1]
    assert vendor.status == 404
    assert as_json(r) == vendor.response_json()
    assert r.headers.get("x-keybrake-key-id") == key["id"]
    tenant.wait_spent(key["id"], Decimal(0))
    assert pay(keybrake, key["token"], 2000).status_code == 200


def test_budget_a_refused_payment_gave_back_pays_the_next_one_at_once(keybrake, tenant, fake_stripe):
    """The budget of a payment Stripe refused (4xx) is the key's again at once: its next
    call, sent right after (no spend report in between), is paid from it, and once the key
    is idle nothing of it stays held."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=50)
    for _ in range(3):
        refused = pay(keybrake, key["token"], 700, customer="cus_doesnotexist")
        assert refused.status_code == 404, refused.text
        paid = pay(keybrake, key["token"], 700)
        assert paid.status_code == 200, paid.text
    tenant.wait_spent(key["id"], Decimal(21))


def test_calls_sent_together_that_fit_the_cap_are_all_taken(keybrake, tenant, fake_stripe):
    """Payments (some refused by Stripe) sent at once on a fresh key, together within its
    cap: none is refused for the cap or the ledger. A reservation that needs the budget
    committed ahead plus a new grant asks the ledger only for the rest."""
    rng = random.Random(7)
    refused = []
    for _ in range(20):
        cap = rng.randint(20, 60)
        key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=cap)
        n = rng.randint(3, 6)
        cuts = sorted(rng.sample(range(1, cap * 100), n - 1))
        amounts = [max(50, b - a - rng.randint(0, 30)) for a, b in zip([0] + cuts, cuts + [cap * 100])]
        while sum(amounts) > cap * 100:
            amounts[amounts.index(max(amounts))] -= 50
        extras = [rng.choice([{"customer": "cus_doesnotexist"}, {}]) for _ in amounts]

        def send(i):
            r = keybrake.proxy("POST", PI, key=key["token"], headers={"x-fake-delay-ms": "300"},
                               data={"amount": amounts[i], "currency": "usd", **extras[i]})
            return amounts[i], r.status_code, r.text[:200]

        with ThreadPoolExecutor(len(amounts)) as pool:
            answers = list(pool.map(send, range(len(amounts))))
        refused += [(cap, a) for a in answers if a[1] in (429, 503)]
    assert not refused, refused


@pytest.mark.parametrize("extra", [{}, LARGE], ids=["small", "large"])
def test_unreachable_vendor_is_502_and_releases_the_reservation(keybrake_factory, stripe_secret, extra):
    """With Stripe unreachable the proxy answers 502 upstream_unavailable and the
    reserved amount is released."""
    kb = keybrake_factory({"stripe": f"http://127.0.0.1:{free_port()}"})
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=20)
    refused = assert_denied(pay(kb, key["token"], 1500, **extra), 502, "upstream_unavailable")
    assert refused["message"].startswith("The vendor could not be reached: connection refused"), refused
    t.wait_spent(key["id"], Decimal(0))


def _direct_payment_method(fake, secret):
    direct = fake.direct(secret)
    r = direct.post(f"{fake.url}/v1/payment_methods", data={
        "type": "card", "card[number]": CARD["number"], "card[exp_month]": "12",
        "card[exp_year]": "2034", "card[cvc]": "123"}, timeout=10)
    assert r.status_code == 200, r.text
    return direct, r.json()["id"]


def test_confirm_and_capture_are_metered_from_the_response_unless_the_key_created_the_intent(
        keybrake, tenant, fake_stripe, stripe_secret):
    """Confirming or capturing a PaymentIntent created elsewhere costs its amount, read
    from Stripe's 2xx answer; confirming one this key created (already metered at
    creation) costs nothing more; refunds are not spend."""
    direct, pm = _direct_payment_method(fake_stripe, stripe_secret)
    foreign = direct.post(f"{fake_stripe.url}/v1/payment_intents",
                          data={"amount": 1200, "currency": "usd", "payment_method": pm}, timeout=10).json()
    held = direct.post(f"{fake_stripe.url}/v1/payment_intents",
                       data={"amount": 300, "currency": "usd", "payment_method": pm,
                             "capture_method": "manual", "confirm": "true"}, timeout=10).json()
    assert held["status"] == "requires_capture"

    key = tenant.issue_key(allowed_endpoints=["/v1/payment_intents", "/v1/payment_intents/**", "POST /v1/refunds"],
                           daily_usd_cap=100)
    client = stripe_client(keybrake, key["token"])
    confirmed = client.v1.payment_intents.confirm(foreign["id"])
    assert confirmed.status == "succeeded"
    tenant.wait_spent(key["id"], Decimal(12))

    captured = client.v1.payment_intents.capture(held["id"])
    assert captured.status == "succeeded"
    tenant.wait_spent(key["id"], Decimal(15))

    own = client.v1.payment_intents.create(params={"amount": 800, "currency": "usd", "payment_method": pm})
    tenant.wait_spent(key["id"], Decimal(23))
    assert client.v1.payment_intents.confirm(own.id).status == "succeeded"
    tenant.wait_spent(key["id"], Decimal(23))

    refund = client.v1.refunds.create(params={"payment_intent": own.id})
    assert refund.id.startswith("re_")
    tenant.wait_spent(key["id"], Decimal(23))


def assert_confirm_refused_at_the_cap(keybrake, tenant, fake_stripe, key, intent_id, spent):
    """The confirm is 429 cap_exhausted, never reaches Stripe (only the look-up of the
    intent does), and spend stays `spent`."""
    def sent():
        return [r for r in fake_stripe.received() if r.method != "GET"]

    before = len(sent())
    assert_denied(keybrake.proxy("POST", f"{PI}/{intent_id}/confirm", key=key["token"]),
                  429, "cap_exhausted")
    assert len(sent()) == before
    tenant.wait_spent(key["id"], spent)


def test_a_confirm_is_reserved_before_it_is_forwarded_and_never_passes_the_cap(
        keybrake, tenant, fake_stripe, stripe_secret):
    """What a confirm can charge (the intent's amount, read from Stripe first) is
    reserved before it is forwarded: with a $10 cap a $8 confirm succeeds and costs $8,
    then a $12 one and another $8 one are refused with 429 cap_exhausted before
    reaching Stripe."""
    direct, pm = _direct_payment_method(fake_stripe, stripe_secret)
    intents = [direct.post(f"{fake_stripe.url}/v1/payment_intents", timeout=10,
                           data={"amount": amount, "currency": "usd", "payment_method": pm}).json()
               for amount in (800, 1200, 800)]
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents/*/confirm"], daily_usd_cap=10)
    first = keybrake.proxy("POST", f"{PI}/{intents[0]['id']}/confirm", key=key["token"])
    assert first.status_code == 200, first.text
    tenant.wait_spent(key["id"], Decimal(8))
    for intent in intents[1:]:
        assert_confirm_refused_at_the_cap(keybrake, tenant, fake_stripe, key, intent["id"], Decimal(8))
    confirms = [r for r in fake_stripe.received() if r.method == "POST" and r.path.endswith("/confirm")]
    assert len(confirms) == 1


def test_concurrent_confirms_never_pass_the_cap(keybrake, tenant, fake_stripe, stripe_secret):
    """16 PaymentIntents of $10 made outside the key; a $25-cap key sends the 16
    confirms at once: exactly 2 reach Stripe and succeed, 14 are 429 cap_exhausted, and
    the key has spent $20."""
    direct, pm = _direct_payment_method(fake_stripe, stripe_secret)
    intents = [direct.post(f"{fake_stripe.url}/v1/payment_intents", timeout=10,
                           data={"amount": 1000, "currency": "usd", "payment_method": pm}).json()
               for _ in range(16)]
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents/*/confirm"], daily_usd_cap=25)
    barrier = threading.Barrier(16, timeout=60)

    def confirm(intent):
        barrier.wait()
        r = keybrake.proxy("POST", f"{PI}/{intent['id']}/confirm", key=key["token"])
        return r.status_code, error_code(r) if r.status_code != 200 else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(confirm, intents))
    assert sorted(results, key=str) == sorted([(200, None)] * 2 + [(429, "cap_exhausted")] * 14, key=str), results
    confirms = [r for r in fake_stripe.received() if r.method == "POST" and r.path.endswith("/confirm")]
    assert len(confirms) == 2 and all(r.status == 200 for r in confirms)
    tenant.wait_spent(key["id"], Decimal(20))


def test_a_key_spent_to_its_cap_can_still_confirm_its_own_intent(keybrake, tenant, fake_stripe, stripe_secret):
    """The create-then-confirm flow at the cap: the intent's amount was charged when the
    key created it, so confirming it costs nothing more and is not refused."""
    _, pm = _direct_payment_method(fake_stripe, stripe_secret)
    key = tenant.issue_key(allowed_endpoints=["/v1/payment_intents", "/v1/payment_intents/**"],
                           daily_usd_cap=5)
    client = stripe_client(keybrake, key["token"])
    own = client.v1.payment_intents.create(params={"amount": 500, "currency": "usd", "payment_method": pm})
    tenant.wait_spent(key["id"], Decimal(5))
    assert client.v1.payment_intents.confirm(own.id).status == "succeeded"
    tenant.wait_spent(key["id"], Decimal(5))


def test_an_own_intent_raised_past_the_cap_is_refused_at_confirm(
        keybrake, tenant, fake_stripe, stripe_secret):
    """A key at its cap may still confirm its own paid intents, but one whose amount an
    update made outside Keybrake raised past the cap is refused with 429 cap_exhausted at
    confirm (the raised amount is read and reserved first), before reaching Stripe."""
    direct, pm = _direct_payment_method(fake_stripe, stripe_secret)
    key = tenant.issue_key(allowed_endpoints=["/v1/payment_intents", "/v1/payment_intents/**"],
                           daily_usd_cap=10)
    client = stripe_client(keybrake, key["token"])
    intents = [client.v1.payment_intents.create(params={"amount": 500, "currency": "usd", "payment_method": pm})
               for _ in range(2)]
    tenant.wait_spent(key["id"], Decimal(10))
    raised = direct.post(f"{fake_stripe.url}/v1/payment_intents/{intents[0].id}", data={"amount": 5000}, timeout=10)
    assert raised.status_code == 200, raised.text
    assert_confirm_refused_at_the_cap(keybrake, tenant, fake_stripe, key, intents[0].id, Decimal(10))
    assert client.v1.payment_intents.confirm(intents[1].id).status == "succeeded"
    tenant.wait_spent(key["id"], Decimal(10))


def test_confirming_another_keys_intent_is_charged_in_full(keybrake, tenant, fake_stripe, stripe_secret):
    """What a key was charged for an intent it created is its own credit: another key
    confirming that intent pays its whole amount."""
    _, pm = _direct_payment_method(fake_stripe, stripe_secret)
    creator = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    confirmer = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents/*/confirm"], daily_usd_cap=100)
    created = pay(keybrake, creator["token"], 700, payment_method=pm)
    assert created.status_code == 200, created.text
    tenant.wait_spent(creator["id"], Decimal(7))
    r = keybrake.proxy("POST", f"{PI}/{created.json()['id']}/confirm", key=confirmer["token"])
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    tenant.wait_spent(confirmer["id"], Decimal(7))
    tenant.wait_spent(creator["id"], Decimal(7))


def test_a_confirm_stripe_replays_after_a_restart_is_not_charged_again(keybrake, tenant, fake_stripe, stripe_secret):
    """A confirm (metered from its answer) retried with its Idempotency-Key after a
    restart: Stripe replays the succeeded intent with `Idempotent-Replayed: true`, which
    charges nothing from the answer; the confirmer paid the $7 once, as Stripe charged."""
    _, pm = _direct_payment_method(fake_stripe, stripe_secret)
    creator = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    confirmer = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents/*/confirm"], daily_usd_cap=100)
    created = pay(keybrake, creator["token"], 700, payment_method=pm)
    assert created.status_code == 200, created.text
    headers = {"Idempotency-Key": f"confirm-{secrets.token_hex(8)}"}
    confirm = f"{PI}/{created.json()['id']}/confirm"
    r = keybrake.proxy("POST", confirm, key=confirmer["token"], headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    tenant.wait_spent(confirmer["id"], Decimal(7))
    keybrake.restart()
    r = keybrake.proxy("POST", confirm, key=confirmer["token"], headers=headers)
    assert r.status_code == 200 and r.headers.get("idempotent-replayed") == "true", r.text
    tenant.wait_spent(confirmer["id"], Decimal(7))
    spends = [e["spend_usd"] for e in tenant.audit_all(key_id=confirmer["id"]) if e["decision"] == "allowed"]
    assert sorted(spends) == [0, 7], spends


def test_raising_an_intents_amount_after_creating_it_is_charged_at_confirm(
        keybrake, tenant, fake_stripe, stripe_secret):
    """A key creates a $1 PaymentIntent. It cannot raise the amount itself (403
    endpoint_unmetered: an update racing a confirm could charge past the cap), but one
    raised to $50 outside Keybrake and then confirmed by the key is charged $50 in all:
    the confirm costs what the intent's amount exceeds what the key was already charged
    for it. A capture after that costs nothing more."""
    direct, pm = _direct_payment_method(fake_stripe, stripe_secret)
    key = tenant.issue_key(allowed_endpoints=["/v1/payment_intents", "/v1/payment_intents/**"],
                           daily_usd_cap=100)
    client = stripe_client(keybrake, key["token"])
    own = client.v1.payment_intents.create(params={"amount": 100, "currency": "usd", "payment_method": pm,
                                                   "capture_method": "manual"})
    tenant.wait_spent(key["id"], Decimal(1))
    with pytest.raises(stripe.StripeError) as info:
        client.v1.payment_intents.update(own.id, params={"amount": 5000})
    assert info.value.http_status == 403 and info.value.json_body["code"] == "endpoint_unmetered"
    raised = direct.post(f"{fake_stripe.url}/v1/payment_intents/{own.id}", data={"amount": 5000}, timeout=10)
    assert raised.status_code == 200 and raised.json()["amount"] == 5000, raised.text
    tenant.wait_spent(key["id"], Decimal(1))
    assert client.v1.payment_intents.confirm(own.id).status == "requires_capture"
    tenant.wait_spent(key["id"], Decimal(50))
    assert client.v1.payment_intents.capture(own.id).status == "succeeded"
    tenant.wait_spent(key["id"], Decimal(50))


def test_an_increment_costs_its_increase_in_the_intents_currency(keybrake, tenant, fake_stripe, stripe_secret):
    """`increment_authorization` carries the held intent's new total and no currency: a
    key that created the £10 intent pays the £5 increase, at the pound's rate; an intent
    it never paid for is charged the whole total at the costliest currency's rate."""
    _, pm = _direct_payment_method(fake_stripe, stripe_secret)
    key = tenant.issue_key(allowed_endpoints=["/v1/payment_intents", "/v1/payment_intents/**"],
                           daily_usd_cap=100)
    client = stripe_client(keybrake, key["token"])
    own = client.v1.payment_intents.create(params={
        "amount": 1000, "currency": "gbp", "payment_method": pm, "capture_method": "manual", "confirm": True})
    assert own.status == "requires_capture"
    tenant.wait_spent(key["id"], usd_of(1000, "gbp"))
    r = keybrake.proxy("POST", f"{PI}/{own.id}/increment_authorization", key=key["token"], data={"amount": 1500})
    assert r.status_code == 200, r.text
    assert r.json()["amount"] == 1500
    tenant.wait_spent(key["id"], usd_of(1500, "gbp"))
    assert client.v1.payment_intents.capture(own.id).status == "succeeded"
    tenant.wait_spent(key["id"], usd_of(1500, "gbp"))

    direct = fake_stripe.direct(stripe_secret)
    held = direct.post(f"{fake_stripe.url}/v1/payment_intents", timeout=10, data={
        "amount": 500, "currency": "usd", "payment_method": pm, "capture_method": "manual",
        "confirm": "true"}).json()
    other = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents/*/increment_authorization"],
                             daily_usd_cap=100)
    # A currency named in the body (Stripe takes none here) cannot make it cheaper.
    before = len(fake_stripe.received_matching("POST", f"{PI}/{held['id']}/increment_authorization"))
    for currency in ("vnd", "VND"):
        r = keybrake.proxy("POST", f"{PI}/{held['id']}/increment_authorization", key=other["token"],
                           data={"amount": 800, "currency": currency})
        assert_denied(r, 403, "endpoint_unmetered")
    assert len(fake_stripe.received_matching("POST", f"{PI}/{held['id']}/increment_authorization")) == before
    r = keybrake.proxy("POST", f"{PI}/{held['id']}/increment_authorization", key=other["token"], data={"amount": 800})
    assert r.status_code == 200, r.text
    tenant.wait_spent(other["id"], usd_of(800, "gbp"))


def test_a_100_continue_before_the_answer_does_not_release_the_reservation(keybrake, tenant, fake_stripe):
    """A vendor may send an informational `100 Continue` before its real answer: the
    payment is still charged when the 200 follows."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    r = keybrake.proxy("POST", PI, key=key["token"], data={"amount": 4200, "currency": "usd"},
                       headers={"x-fake-send-100": "1"})
    assert r.status_code == 200, r.text
    tenant.wait_spent(key["id"], Decimal(42))


def test_expect_100_continue_is_answered_and_not_forwarded(keybrake, tenant, fake_stripe):
    """A client that sends `Expect: 100-continue` and holds its body back until it is
    told to go on (as curl does for large bodies) gets `100 Continue` from Keybrake,
    which reads the body to meter it; Keybrake then sends the whole body with the header
    and drops `Expect`; the payment is charged."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    body = b"amount=3100&currency=usd"
    with socket.create_connection(("127.0.0.1", keybrake.proxy_port), timeout=10) as s:
        s.sendall((f"POST {PI} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key['token']}\r\n"
                   f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
                   "Expect: 100-continue\r\n\r\n").encode())
        s.settimeout(5)
        interim = s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim[:200]
        s.sendall(body)
        answer = interim.split(b"\r\n\r\n", 1)[1]
        while b"\r\n\r\n" not in answer:
            answer += s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b"connection: close" not in answer.lower(), "a 100 Continue must not close the connection"
    received = fake_stripe.received()[-1]
    assert "expect" not in received.headers and received.body == body
    tenant.wait_spent(key["id"], Decimal(31))


def test_chunked_metered_body_is_metered_and_forwarded_intact(keybrake, tenant, fake_stripe):
    """A metered body sent with Transfer-Encoding: chunked is read, metered and
    forwarded with the same bytes."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    parts = [b"amount=", b"450", b"&currency=", b"usd&metadata[order]=", b"A-17"]
    r = requests.post(f"{keybrake.proxy_url}{PI}", data=iter(parts), timeout=30,
                      headers={"Authorization": f"Bearer {key['token']}",
                               "Content-Type": "application/x-www-form-urlencoded"})
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 200, r.text
    assert fake_stripe.received()[-1].body == b"".join(parts)
    tenant.wait_spent(key["id"], Decimal("4.5"))


def test_hop_by_hop_headers_are_not_forwarded(keybrake, tenant, fake_stripe):
    """Headers named in Connection, Keep-Alive, Proxy-Connection and TE are hop-by-hop:
    the vendor never receives them; ordinary headers pass."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"])
    r = keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"], headers={
        "Connection": "keep-alive, X-Hop-Secret",
        "X-Hop-Secret": "drop-me",
        "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive",
        "TE": "trailers",
        "X-Request-Note": "keep-me",
    })
    assert r.status_code == 200, r.text
    got = fake_stripe.received()[-1].headers
    for h in ("x-hop-secret", "keep-alive", "proxy-connection", "te"):
        assert h not in got, f"hop-by-hop header {h} forwarded: {got}"
    assert got.get("x-request-note") == "keep-me"


def test_vendor_secret_rotation_applies_to_the_next_call(keybrake, tenant, fake_stripe, stripe_secret):
    """Replacing the Stripe credential takes effect on the next proxied call; deleting it
    stops forwarding altogether (the old secret is never used again)."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"])
    assert keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"]).status_code == 200
    new_secret = "sk_test_" + secrets.token_hex(20)
    tenant.put_credential("stripe", new_secret)
    assert keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"]).status_code == 200
    assert [r.authorization for r in fake_stripe.received()] == [f"Bearer {stripe_secret}", f"Bearer {new_secret}"]

    assert tenant.call("DELETE", "/v1/vendors/stripe/credential").status_code == 200
    r = keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"])
    assert r.status_code >= 400, r.text
    denial(r)
    assert len(fake_stripe.received()) == 2


# --------------------------------------------------------------------------- revocation & keys


def test_revoked_key_is_refused_immediately(keybrake, tenant, fake_stripe):
    """(4) Right after DELETE /v1/keys/{id}, the next call is 401 key_revoked and never
    reaches Stripe."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"])
    assert keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"]).status_code == 200
    assert tenant.revoke(key["id"]).status_code == 200
    assert_denied(keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"]), 401, "key_revoked")
    assert len(fake_stripe.received()) == 1


def test_revocations_past_the_filters_first_size_are_refused_and_a_live_key_is_not(keybrake, tenant):
    """The revocation filter starts sized for 1,024 ids and is swapped for a larger one as
    it fills (src/revocation.rs): after 1,030 revocations every revoked key sampled is still
    401 key_revoked, a live key passes, and the gauge counts them all."""
    keys = [tenant.issue_key(allowed_endpoints=["GET /v1/customers"]) for _ in range(1031)]
    live = keys.pop()
    for k in keys:
        assert tenant.revoke(k["id"]).status_code == 200
    for k in keys[::50] + keys[-5:]:
        assert_denied(keybrake.proxy("GET", "/stripe/v1/customers", key=k["token"]), 401, "key_revoked")
    assert keybrake.proxy("GET", "/stripe/v1/customers", key=live["token"]).status_code == 200
    text = requests.get(f"{keybrake.metrics_url}/metrics", timeout=10).text
    assert re.search(r"^keybrake_revoked_keys 1030$", text, re.M), text


def _hs256(header, claims, secret: bytes) -> str:
    h = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    p = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"vk_{h}.{p}.{b64url_encode(sig)}"


def _ed25519(header, claims, private_key) -> str:
    h = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    p = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    sig = private_key.sign(f"{h}.{p}".encode())
    return f"vk_{h}.{p}.{b64url_encode(sig)}"


def _forge(kind, token, public_jwk):
    header, claims, sig = token_parts(token)
    h_seg, p_seg, _ = token[3:].split(".")
    x = public_jwk["x"]
    if kind == "alg_none":
        return make_token({**header, "alg": "none"}, claims, "")
    if kind == "alg_none_keeping_signature":
        return make_token({**header, "alg": "none"}, claims, sig)
    if kind == "hs256_with_raw_public_key":
        return _hs256({**header, "alg": "HS256"}, claims, b64url_decode(x))
    if kind == "hs256_with_base64_public_key":
        return _hs256({**header, "alg": "HS256"}, claims, x.encode())
    if kind == "rs256_header":
        return make_token({**header, "alg": "RS256"}, claims, sig)
    if kind == "raised_cap":
        return make_token(header, {**claims, "cap": claims["cap"] * 1000}, sig)
    if kind == "extended_exp":
        return make_token(header, {**claims, "exp": claims["exp"] + 86400}, sig)
    if kind == "other_tenant":
        return make_token(header, {**claims, "ten": "tn_someoneelse"}, sig)
    if kind == "wider_endpoints":
        return f"vk_{h_seg}." + b64url_encode(json.dumps({**claims, "eps": ["/v1/**"]}).encode()) + f".{sig}"
    if kind == "unknown_kid":
        return _ed25519({**header, "kid": "kid-unknown-" + secrets.token_hex(4)}, claims, Ed25519PrivateKey.generate())
    if kind == "right_kid_wrong_key":
        return _ed25519(header, claims, Ed25519PrivateKey.generate())
    if kind == "no_kid":
        h = dict(header)
        h.pop("kid", None)
        return make_token(h, claims, sig)
    if kind == "no_vk_prefix":
        return token[3:]
    if kind == "truncated":
        return token[:-10]
    if kind == "garbage":
        return "vk_not.a.jwt"
    if kind == "stripe_secret_shape":
        return "sk_live_" + secrets.token_hex(12)
    raise AssertionError(kind)


FORGERIES = [
    "alg_none",
    "alg_none_keeping_signature",
    "hs256_with_raw_public_key",
    "hs256_with_base64_public_key",
    "rs256_header",
    "raised_cap",
    "extended_exp",
    "other_tenant",
    "wider_endpoints",
    "unknown_kid",
    "right_kid_wrong_key",
    "no_kid",
    "no_vk_prefix",
    "truncated",
    "garbage",
    "stripe_secret_shape",
]


@pytest.mark.parametrize("kind", FORGERIES)
def test_forged_or_tampered_tokens_are_invalid_key(keybrake, tenant, fake_stripe, kind):
    """(5) Only genuine EdDSA signatures by this Keybrake are accepted: alg none, HS256
    keyed with the public key, tampered claims, unknown kid, a foreign key, malformed
    tokens all answer 401 invalid_key and never reach Stripe."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"], daily_usd_cap=1)
    header, _, _ = token_parts(key["token"])
    public = [k for k in jwks(keybrake) if k["kid"] == header["kid"]][0]
    forged = _forge(kind, key["token"], public)
    path = "/stripe/v1/customers" if kind != "wider_endpoints" else "/stripe/v1/charges"
    assert_denied(keybrake.proxy("GET", path, key=forged), 401, "invalid_key")
    assert fake_stripe.received() == []
    # the genuine token still works
    assert keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"]).status_code == 200


def test_forged_tokens_arriving_with_fresh_genuine_ones_are_refused_each(keybrake, tenant, fake_stripe):
    """Fresh keys that arrive together have their signatures checked in one batch: a
    forged token among them (a genuine signature on raised claims, a foreign key's
    signature) is refused alone, every genuine one is charged, and nothing forged reaches
    Stripe, however the requests interleave."""
    genuine = [tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=5)["token"]
               for _ in range(48)]
    header, _, _ = token_parts(genuine[0])
    public = [k for k in jwks(keybrake) if k["kid"] == header["kid"]][0]
    forged = [_forge(kind, genuine[i], public)
              for i, kind in enumerate(["raised_cap", "right_kid_wrong_key", "extended_exp"] * 8)]
    calls = [(t, True) for t in genuine] + [(t, False) for t in forged]
    calls = [calls[i] for i in sorted(range(len(calls)), key=lambda i: (i * 37) % len(calls))]
    def counter(name):
        text = requests.get(f"{keybrake.metrics_url}/metrics", timeout=5).text
        return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " "))

    before = counter("keybrake_token_signature_batches_total")
    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(lambda c: (pay(keybrake, c[0], 100), c[1]), calls))
    print("signature checks for", len(calls), "fresh tokens:",
          counter("keybrake_token_signature_batches_total") - before)
    for resp, is_genuine in answers:
        if is_genuine:
            assert resp.status_code == 200, resp.text
        else:
            assert_denied(resp, 401, "invalid_key")
    assert len(accepted_intents(fake_stripe)) == len(genuine)
    # A batch that failed sends the next checks one by one for a moment: genuine fresh
    # keys are still served.
    more = [tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=5)["token"]
            for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda t: pay(keybrake, t, 100), more))


def test_token_from_another_keybrake_is_invalid_key(keybrake, tenant, fake_stripe, keybrake_factory):
    """(5) A vault key minted by a different Keybrake installation (its own signing keys)
    is 401 invalid_key here."""
    other = keybrake_factory({"stripe": fake_stripe.url})
    t2 = other.create_tenant()
    t2.put_credential("stripe", "sk_test_" + secrets.token_hex(20))
    foreign = t2.issue_key(allowed_endpoints=["GET /v1/customers"])
    assert other.proxy("GET", "/stripe/v1/customers", key=foreign["token"]).status_code == 200
    n = len(fake_stripe.received())
    assert_denied(keybrake.proxy("GET", "/stripe/v1/customers", key=foreign["token"]), 401, "invalid_key")
    assert len(fake_stripe.received()) == n


def test_missing_key_is_401(keybrake, tenant, fake_stripe):
    """(5) A call without any vault key is 401 missing_key."""
    assert_denied(keybrake.proxy("GET", "/stripe/v1/customers"), 401, "missing_key")
    assert_denied(
        keybrake.proxy("GET", "/stripe/v1/customers", headers={"Authorization": "Bearer "}), 401, "missing_key"
    )
    assert fake_stripe.received() == []


def test_expired_key_is_refused(keybrake, tenant, fake_stripe):
    """(5) A key issued with expires_in "1s" works at first and is 401 key_expired once
    its expiry (plus at most the 5 s leeway SPEC §2 allows) has passed. The refusal is in
    the key's audit trail (its signature held: the key is known), though the proxy never
    saw the key before it expired."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"], expires_in="1s")
    exp = parse_ts(key["expires_at"])
    time.sleep(max(0.0, exp - time.time()) + 5.5)
    assert_denied(keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"]), 401, "key_expired")
    assert fake_stripe.received() == []
    assert wait_until(lambda: len(tenant.audit(key_id=key["id"])) == 1, timeout=10)
    [event] = tenant.audit(key_id=key["id"])
    assert (event["decision"], event["status"], event["label"]) == ("key_expired", 401, key["label"])


# --------------------------------------------------------------------------- paths


def raw_request(kb, method, raw_path, token, body=None, headers=None):
    """Send `raw_path` exactly as written (no client-side normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", kb.proxy_port, timeout=15)
    try:
        conn.putrequest(method, raw_path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


BAD_PATHS = [
    "/stripe/v1/customers/../payment_intents",
    "/stripe/v1/customers/..",
    "/stripe/v1/customers/%2e%2e/payment_intents",
    "/stripe/v1/customers/%2E%2E/payment_intents",
    "/stripe/v1/customers/.%2e/payment_intents",
    "/stripe/v1/./customers",
    "/stripe/v1/%2e/customers",
    "/stripe/v1/customers%2Fcus_123",
    "/stripe/v1/customers%2fcus_123",
    "/stripe/v1/customers/cus_1%2F..%2Fpayment_intents",
    "/stripe/v1//customers",
    "/stripe//v1/customers",
    "/stripe/v1/customers/",
    "/stripe/v1/customers/%5Ccus_123",
    "/stripe/v1/customers/%5ccus_123",
    "/stripe/v1/customers/\\cus_123",
    "/stripe/v1/customers/..\\payment_intents",
    "/stripe/v1/customers/cus%00x",
    "/stripe/v1/customers/cus%0ax",
    "/stripe/v1/customers/cus%0dx",
    "/stripe/v1/customers/cus%1fx",
    "/stripe/v1/customers/cus%7fx",
    "/stripe/v1/customers/cus%zz",
    "/stripe/v1/customers/cus%2",
    # A segment's parameters to servers that read them: the path acted on is not the one matched.
    "/stripe/v1/charges/ch_1;x/capture",
    "/stripe/v1/charges/ch_1%3Bcapture",
]


@pytest.mark.parametrize("raw_path", BAD_PATHS)
def test_non_canonical_paths_are_rejected_and_never_forwarded(keybrake, tenant, fake_stripe, raw_path):
    """(6) `..` / `.` segments (also encoded), encoded `/` or `\\`, raw backslashes, empty
    segments, NUL and control bytes, a `;` (also encoded): 400 invalid_path, nothing
    reaches Stripe — even for a key allowed everything under /v1/**."""
    key = tenant.issue_key(allowed_endpoints=["/v1/**"])
    for method in ("GET", "POST"):
        body = b"amount=100&currency=usd" if method == "POST" else None
        hdrs = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        status, _, data = raw_request(keybrake, method, raw_path, key["token"], body, hdrs)
        assert status == 400, f"{method} {raw_path} -> {status} {data[:300]!r}"
        parsed = json.loads(data)
        assert parsed["code"] == "invalid_path" and parsed["error"]["code"] == "invalid_path", parsed
    assert fake_stripe.received() == []


def test_a_key_trying_path_tricks_is_named_in_its_tenants_audit(keybrake, tenant, fake_stripe):
    """A refused non-canonical path still names the (valid) key that sent it in the
    tenant's audit trail, with the path as sent: the tenant sees its agent probing."""
    key = tenant.issue_key(allowed_endpoints=["/v1/**"])
    tricks = ["/stripe/v1/customers/%2E%2E/payouts", "/stripe/v1/customers%2Fcus_1", "/stripe//v1/payouts"]
    for raw_path in tricks:
        status, _, data = raw_request(keybrake, "POST", raw_path, key["token"], b"amount=1&currency=usd",
                                      {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 400 and json.loads(data)["code"] == "invalid_path", data
    events = wait_until(lambda: (lambda e: e if len(e) == len(tricks) else None)(tenant.audit(key_id=key["id"])),
                        timeout=5)
    assert events and sorted(e["path"] for e in events) == sorted(tricks), events
    assert all(e["decision"] == "invalid_path" and e["status"] == 400 and e["spend_usd"] == 0 for e in events), events
    assert fake_stripe.received() == []


def test_a_token_a_client_puts_in_the_path_reaches_no_log_or_audit(keybrake, tenant, fake_stripe):
    """A client that pastes its vault key (or another Keybrake token) into the URL path,
    forwarded or refused: the access log and the audit show `vk_[redacted]`, never the
    token (SPEC §7)."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers/*"])
    r = keybrake.proxy("GET", f"/stripe/v1/customers/{key['token']}", key=key["token"])
    assert_denied(r, 401, "invalid_key")
    assert fake_stripe.received() == []
    status, _, _ = raw_request(keybrake, "GET", f"/stripe/v1/..%2F{tenant.token}", key["token"], None, {})
    assert status == 400
    events = wait_until(lambda: (lambda e: e if len(e) >= 2 else None)(tenant.audit(key_id=key["id"])), timeout=5)
    paths = sorted(e["path"] for e in events)
    assert paths == ["/stripe/v1/..%2Fkb_[redacted]", "/stripe/v1/customers/vk_[redacted]"], paths
    logged = wait_until(lambda: [line for line in keybrake.logs().splitlines() if "[redacted]" in line] or None,
                        timeout=5)
    assert logged, keybrake.logs()[-2000:]
    logs = keybrake.logs()
    assert key["token"] not in logs and tenant.token not in logs


def test_a_refused_paths_odd_bytes_reach_no_log_or_audit_raw(keybrake, tenant, fake_stripe):
    """A path with C1 controls (a terminal's CSI/OSC) and a right-to-left override, sent
    raw: refused 400 invalid_path, and the access log line and the audit event show it
    percent-encoded, so no one reading them gets a terminal escape or reordered text."""
    key = tenant.issue_key(allowed_endpoints=["/v1/**"])
    raw = b"/stripe/v1/PROBE\xc2\x9b2J\xc2\x9d0;T\xc2\x9c/\xe2\x80\xaex/.."
    with socket.create_connection(("127.0.0.1", keybrake.proxy_port), timeout=10) as s:
        s.sendall(b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + key["token"].encode() + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"invalid_path" in answer, answer[:300]
    encoded = "/stripe/v1/PROBE%C2%9B2J%C2%9D0;T%C2%9C/%E2%80%AEx/.."
    events = wait_until(lambda: tenant.audit(key_id=key["id"]) or None, timeout=5)
    assert events and events[0]["path"] == encoded, events
    assert (events[0]["vendor"], events[0]["decision"]) == ("stripe", "invalid_path"), events
    logged = wait_until(lambda: [line for line in keybrake.logs().splitlines() if "PROBE" in line] or None,
                        timeout=5)
    assert logged and all(encoded in line and "\u009b" not in line and "\u202e" not in line
                          and "\x9b" not in line for line in logged), logged
    assert fake_stripe.received() == []


@pytest.mark.parametrize("size", [b"zz", b"10000000000000004"])
def test_a_body_with_broken_framing_closes_the_connection(keybrake, tenant, fake_stripe, size):
    """A chunked body whose chunk size cannot be read: 400 invalid_body, and the
    connection closes, so bytes after it are never taken for a next request (which would
    go to Stripe with the secret injected)."""
    key = tenant.issue_key(allowed_endpoints=["/v1/**"])
    smuggled = (b"GET /stripe/v1/customers/cus_SMUGGLED HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + key["token"].encode() + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", keybrake.proxy_port), timeout=10) as s:
        s.sendall(b"POST /stripe/v1/products HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key["token"].encode()
                  + b"\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + size + b"\r\nname=x\r\n0\r\n\r\n" + smuggled)
        answer = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"invalid_body" in answer, answer[:400]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert fake_stripe.received() == []


def test_encoded_unreserved_characters_are_decoded_before_matching(keybrake, tenant, fake_stripe):
    """Percent-encoded unreserved characters are decoded: the canonical path is what is
    matched against the allowlist and what Stripe receives."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers/*"])
    status, headers, data = raw_request(keybrake, "GET", "/stripe/v1/%63ustomers/cus%5Fabc%2D1%7E", key["token"])
    assert status == 404, data  # localstripe: no such customer; the request was forwarded
    assert fake_stripe.received()[-1].path == "/v1/customers/cus_abc-1~"
    assert headers.get("x-keybrake-key-id") == key["id"]


def test_reserved_and_non_ascii_escapes_stay_encoded(keybrake, tenant, fake_stripe):
    """Only unreserved characters are decoded: an encoded ':' or UTF-8 byte is forwarded
    still encoded, exactly as sent."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers/*"])
    for raw, forwarded in (("cus%3A1", "/v1/customers/cus%3A1"), ("caf%C3%A9", "/v1/customers/caf%C3%A9")):
        status, _, data = raw_request(keybrake, "GET", f"/stripe/v1/customers/{raw}", key["token"])
        assert status == 404, data  # forwarded; localstripe has no such customer
        assert fake_stripe.received()[-1].path.upper() == forwarded.upper()


def test_authorization_scheme_is_case_insensitive(keybrake, tenant, fake_stripe):
    """`authorization: bearer vk_…` (lower-case scheme, RFC 7235) is accepted."""
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"])
    r = keybrake.proxy("GET", "/stripe/v1/customers", headers={"authorization": f"bearer {key['token']}"})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- scope


SCOPE_CASES = [
    # (allowed_endpoints, method, path, allowed?)
    (["POST /v1/payment_intents"], "GET", "/v1/customers", False),
    (["POST /v1/payment_intents"], "GET", "/v1/payment_intents", False),
    (["GET /v1/payment_intents/*"], "POST", "/v1/payment_intents/pi_123", False),
    (["GET /v1/payment_intents/*"], "GET", "/v1/payment_intents/pi_123", True),
    (["/v1/payment_intents/*"], "POST", "/v1/payment_intents/pi_123/confirm", False),
    (["/v1/payment_intents/*"], "GET", "/v1/payment_intents", False),
    (["/v1/payment_intents"], "GET", "/v1/payment_intents", True),
    (["/v1/payment_intents"], "GET", "/v1/payment_intents/pi_123", False),
    (["/v1/customers/**"], "GET", "/v1/customers", True),
    (["/v1/customers/**"], "GET", "/v1/customers/cus_1/sources", True),
    (["/v1/customers/**"], "GET", "/v1/customersX", False),
    (["/v1/*/cus_1"], "GET", "/v1/customers/cus_1", True),
    (["DELETE /v1/customers/*"], "GET", "/v1/customers/cus_1", False),
]


@pytest.mark.parametrize("patterns,method,path,allowed", SCOPE_CASES)
def test_endpoint_allowlist_is_enforced(keybrake, tenant, fake_stripe, patterns, method, path, allowed):
    """(7) A call outside allowed_endpoints (path or method) is 403 endpoint_not_allowed
    and never reaches Stripe; a call inside is forwarded as is."""
    key = tenant.issue_key(allowed_endpoints=patterns)
    r = keybrake.proxy(method, f"/stripe{path}", key=key["token"])
    if allowed:
        assert r.status_code not in (401, 403), r.text
        assert r.headers.get("x-keybrake-key-id") == key["id"]
        assert [(x.method, x.path) for x in fake_stripe.received()] == [(method, path)]
    else:
        assert_denied(r, 403, "endpoint_not_allowed")
        assert fake_stripe.received() == []


@pytest.mark.parametrize("method", ["post", "Post", "PURGE", "CHARGE"])
def test_non_standard_methods_are_refused_even_where_any_method_is_allowed(keybrake, tenant, fake_stripe, method):
    """Methods are case-sensitive: `post` or an extension method would pass a pattern that
    allows every method yet escape the `POST` metering rule. 403 endpoint_not_allowed,
    never forwarded."""
    key = tenant.issue_key(allowed_endpoints=["/v1/payment_intents"], daily_usd_cap=1)
    conn = http.client.HTTPConnection("127.0.0.1", keybrake.proxy_port, timeout=30)
    body = b"amount=999999&currency=usd"
    conn.request(method, PI, body=body, headers={
        "Authorization": f"Bearer {key['token']}", "Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    text = r.read()
    conn.close()
    assert r.status == 403, text[:300]
    assert json.loads(text)["code"] == "endpoint_not_allowed"
    assert "is not a method any vendor API uses" in json.loads(text)["message"], text
    assert fake_stripe.received() == []


def test_stripe_key_used_on_another_vendor_is_vendor_mismatch(keybrake_factory, fake_stripe_factory, stripe_secret):
    """(7) A Stripe vault key sent to /openai/… is 403 vendor_mismatch before any
    contact with OpenAI's upstream; an unknown vendor prefix is 404 unknown_vendor."""
    stripe_fake = fake_stripe_factory()
    openai_fake = fake_stripe_factory()  # any recording server stands in for OpenAI
    kb = keybrake_factory({"stripe": stripe_fake.url, "openai": openai_fake.url})
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    t.put_credential("openai", "sk-openai-" + secrets.token_hex(8))
    key = t.issue_key(allowed_endpoints=["/v1/**"])
    r = kb.proxy("POST", "/openai/v1/chat/completions", key=key["token"],
                 json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert_denied(r, 403, "vendor_mismatch")
    assert_denied(kb.proxy("GET", "/nosuchvendor/v1/things", key=key["token"]), 404, "unknown_vendor")
    assert openai_fake.received() == []
    assert stripe_fake.received() == []


def test_stripe_account_header_must_be_listed_on_the_key(keybrake, tenant, fake_stripe):
    """(7) Stripe-Account / Stripe-Context are forwarded only for accounts listed in the
    key's stripe_accounts (else 403 account_not_allowed); Idempotency-Key passes
    untouched."""
    plain = tenant.issue_key(allowed_endpoints=["/v1/customers"])
    connect = tenant.issue_key(allowed_endpoints=["/v1/customers"], stripe_accounts=["acct_1ALLOWED"])

    assert_denied(
        keybrake.proxy("GET", "/stripe/v1/customers", key=plain["token"], headers={"Stripe-Account": "acct_1ALLOWED"}),
        403, "account_not_allowed",
    )
    assert_denied(
        keybrake.proxy("GET", "/stripe/v1/customers", key=connect["token"], headers={"Stripe-Account": "acct_2OTHER"}),
        403, "account_not_allowed",
    )
    assert_denied(
        keybrake.proxy("GET", "/stripe/v1/customers", key=connect["token"], headers={"Stripe-Context": "acct_2OTHER"}),
        403, "account_not_allowed",
    )
    assert fake_stripe.received() == []

    client = stripe_client(keybrake, connect["token"])
    client.v1.customers.list(options={"stripe_account": "acct_1ALLOWED"})
    assert fake_stripe.received()[-1].headers.get("stripe-account") == "acct_1ALLOWED"

    r = keybrake.proxy(
        "POST", "/stripe/v1/customers", key=connect["token"],
        headers={"Stripe-Context": "acct_1ALLOWED", "Idempotency-Key": "idem-Abc_123"}, data={"name": "x"},
    )
    assert r.status_code == 200, r.text
    last = fake_stripe.received()[-1]
    assert last.headers.get("stripe-context") == "acct_1ALLOWED"
    assert last.headers.get("idempotency-key") == "idem-Abc_123"
    assert len(fake_stripe.received()) == 2


# --------------------------------------------------------------------------- bodies


def test_seed_json_payment_is_form_encoded_metered_and_answered_as_stripe(keybrake, tenant, fake_stripe, stripe_secret):
    """(9) The seed's handler posts JSON {amount, currency, customer, confirm,
    automatic_payment_methods: {enabled: true}}: Stripe receives it form-encoded with
    bracket notation, the amount is metered, and the agent gets Stripe's status and JSON."""
    direct = fake_stripe.direct(stripe_secret)
    pm = direct.post(f"{fake_stripe.url}/v1/payment_methods", data={
        "type": "card", "card[number]": CARD["number"], "card[exp_month]": "12",
        "card[exp_year]": "2034", "card[cvc]": "123"}, timeout=10).json()
    customer = direct.post(f"{fake_stripe.url}/v1/customers", data={"payment_method": pm["id"]}, timeout=10).json()
    setup_calls = len(fake_stripe.received())

    key = tenant.issue_key(
        label="deno-charge-req-1",
        allowed_endpoints=["/v1/payment_intents", "/v1/payment_intents/*"],
        daily_usd_cap=500,
        expires_in="5m",
    )
    r = requests.post(
        f"{keybrake.proxy_url}/stripe/v1/payment_intents",
        headers={"Authorization": f"Bearer {key['token']}", "Content-Type": "application/json"},
        data=json.dumps({
            "amount": 4200,
            "currency": "usd",
            "customer": customer["id"],
            "confirm": True,
            "automatic_payment_methods": {"enabled": True},
        }),
        timeout=30,
    )
    received = fake_stripe.received()[setup_calls:]
    assert len(received) == 1
    vendor = received[0]
    assert vendor.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
    form = vendor.form
    assert ("automatic_payment_methods[enabled]", "true") in form, form
    assert ("amount", "4200") in form and ("currency", "usd") in form
    assert ("customer", customer["id"]) in form and ("confirm", "true") in form
    assert vendor.authorization == f"Bearer {stripe_secret}"

    assert r.status_code == vendor.status == 200, r.text
    payment = as_json(r)
    assert payment == vendor.response_json()
    assert payment["status"] == "succeeded" and payment["amount"] == 4200
    assert r.headers.get("x-keybrake-key-id") == key["id"]
    tenant.wait_spent(key["id"], Decimal(42))


def test_json_arrays_and_nested_objects_become_bracket_notation(keybrake, tenant, fake_stripe):
    """JSON arrays and nested objects sent to a Stripe v1 endpoint arrive as
    `preferred_locales[0]=…`, `metadata[k]=…`."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/customers"])
    r = keybrake.proxy("POST", "/stripe/v1/customers", key=key["token"],
                       json={"name": "Ada", "preferred_locales": ["fr", "en"], "metadata": {"team": "billing"}})
    assert r.status_code == 200, r.text
    form = fake_stripe.received()[-1].form
    assert ("preferred_locales[0]", "fr") in form and ("preferred_locales[1]", "en") in form, form
    assert ("metadata[team]", "billing") in form and ("name", "Ada") in form
    assert as_json(r)["preferred_locales"] == ["fr", "en"]


def test_metered_body_over_the_limit_is_413(keybrake, tenant, fake_stripe):
    """A metered request body over 1 MiB (form or JSON) is 413 body_too_large and never
    forwarded."""
    key = tenant.issue_key(allowed_endpoints=["/v1/**"])
    pad = "x" * (1024 * 1024 + 100)
    assert_denied(pay(keybrake, key["token"], 100, **{"metadata[pad]": pad}), 413, "body_too_large")
    r = keybrake.proxy("POST", PI, key=key["token"], json={"amount": 100, "currency": "usd", "metadata": {"pad": pad}})
    assert_denied(r, 413, "body_too_large")
    assert fake_stripe.received() == []
    tenant.wait_spent(key["id"], Decimal(0))


def test_unmetered_body_with_content_length_over_the_limit_is_413(keybrake, tenant, fake_stripe):
    """An unmetered request announcing a body above the limit is 413 body_too_large
    (as documented in conf/keybrake.yaml) and never forwarded."""
    key = tenant.issue_key(allowed_endpoints=["/v1/**"])
    r = keybrake.proxy("POST", "/stripe/v1/customers", key=key["token"],
                       data={"description": "y" * (1024 * 1024 + 100)})
    assert_denied(r, 413, "body_too_large")
    assert fake_stripe.received() == []


def test_body_limit_comes_from_the_config_file(keybrake_factory, fake_stripe, stripe_secret, tmp_path):
    """With body_limit_bytes: 4096 in --config, a 5 KB metered body is 413 body_too_large
    and a 3 KB one is forwarded byte for byte."""
    config = write_config(tmp_path / "conf", body_limit_bytes=4096)
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"])
    assert_denied(pay(kb, key["token"], 100, **{"metadata[pad]": "p" * 5000}), 413, "body_too_large")
    assert fake_stripe.received() == []
    body = ("amount=100&currency=usd&metadata[pad]=" + "p" * 3000).encode()
    r = kb.proxy("POST", PI, key=key["token"], data=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert fake_stripe.received()[-1].body == body


def _send_body_in_pieces(kb, token, body: bytes, pieces, pause: float, path: str = PI):
    """POSTs a payment (or to `path`) whose declared Content-Length is len(body) but whose
    bytes are sent as `pieces` (byte counts), `pause` seconds apart; returns (status, JSON
    body, seconds from the first byte to the answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", kb.proxy_port, timeout=30)
    conn.putrequest("POST", path)
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Type", "application/x-www-form-urlencoded")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    start = time.monotonic()
    sent = 0
    try:
        for n in pieces:
            conn.send(body[sent:sent + n])
            sent += n
            time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered and closed before the rest was sent
    r = conn.getresponse()
    data = json.loads(r.read() or b"null")
    conn.close()
    return r.status, data, time.monotonic() - start


def test_a_body_that_does_not_arrive_in_time_is_408_and_never_forwarded(
        keybrake_factory, fake_stripe, stripe_secret, tmp_path):
    """With body_read_timeout_ms: 1000, a metered body that stalls half-way, and one
    dripped a byte at a time (each byte well within a second, the whole body not), are
    408 body_timeout about a second after they started and never reach Stripe; a body
    sent in two parts 0.2 s apart is served."""
    config = write_config(tmp_path / "conf", body_read_timeout_ms=1000)
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"])
    body = b"amount=100&currency=usd"

    status, data, took = _send_body_in_pieces(kb, key["token"], body, [11], pause=0)
    assert (status, data["code"]) == (408, "body_timeout"), data
    assert 0.8 < took < 5, took
    status, data, took = _send_body_in_pieces(kb, key["token"], body, [1] * len(body), pause=0.15)
    assert (status, data["code"]) == (408, "body_timeout"), data
    assert 0.8 < took < 5, took
    assert fake_stripe.received() == []

    status, data, _ = _send_body_in_pieces(kb, key["token"], body, [11, len(body) - 11], pause=0.2)
    assert status == 200, data
    assert fake_stripe.received()[-1].body == body


def test_a_streamed_body_that_stalls_is_the_clients_timeout_not_the_vendors(
        keybrake_factory, fake_stripe, stripe_secret, tmp_path):
    """A body Keybrake streams to the vendor as it comes (a free endpoint it need not
    read): the client stalls half-way, the vendor waits for the rest until the upstream
    read timeout. The answer is 408 body_timeout (the client's delay), not 504
    upstream_timeout."""
    config = write_config(tmp_path / "conf", upstream={"read_timeout_ms": 1500})
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    key = t.issue_key(allowed_endpoints=["POST /v1/tokens"])
    body = b"card[number]=4242424242424242&card[exp_month]=12&card[exp_year]=2030&card[cvc]=123"
    status, data, took = _send_body_in_pieces(kb, key["token"], body, [5], pause=0, path="/stripe/v1/tokens")
    assert (status, data["code"]) == (408, "body_timeout"), data
    assert took < 10, took


def test_a_client_that_hangs_up_mid_body_after_it_went_upstream_is_audited_as_allowed(
        keybrake, tenant, fake_stripe):
    """A free call whose body Keybrake streams to the vendor as it comes: the client hangs
    up half-way. Part of the call already went to the vendor, so the audit does not call
    it a refusal (a refusal never reaches the vendor): `allowed`, status 0 (no answer)."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/tokens"])
    with socket.create_connection(("127.0.0.1", keybrake.proxy_port), timeout=10) as s:
        s.sendall(b"POST /stripe/v1/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + key["token"].encode() + b"\r\nContent-Type: application/x-www-form-urlencoded"
                  b"\r\nContent-Length: 100\r\n\r\ncard[number]=4242")
        time.sleep(0.5)
    events = wait_until(lambda: tenant.audit(key_id=key["id"]) or None, timeout=5)
    assert [(e["decision"], e["status"]) for e in events] == [("allowed", 0)], events


def test_60_kib_metered_body_reaches_stripe_byte_for_byte(keybrake, tenant, fake_stripe):
    """A ~60 KiB metered payment body (many metadata fields) is forwarded unchanged,
    byte for byte, and its amount is metered."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    fields = "&".join(f"metadata[field_{i:02d}]={secrets.token_hex(500)}" for i in range(60))
    body = f"amount=700&currency=usd&{fields}".encode()
    assert 60_000 < len(body) < 70_000
    r = keybrake.proxy("POST", PI, key=key["token"], data=body,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert fake_stripe.received()[-1].body == body
    tenant.wait_spent(key["id"], Decimal(7))


class _SlowForBigBodies(http.server.BaseHTTPRequestHandler):
    """A vendor that answers small payments at once and works on a big one for longer than
    the proxy's read timeout: every request it read whole is counted."""
    protocol_version = "HTTP/1.1"
    big_requests: list[int] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if b"metadata[slow]=yes" in body:
            type(self).big_requests.append(len(body))
            time.sleep(3)
            self.close_connection = True
            return
        raw = json.dumps({"id": "pi_" + secrets.token_hex(6), "object": "payment_intent",
                          "amount": 100, "currency": "usd"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def test_a_big_payment_whose_answer_times_out_is_sent_to_the_vendor_once(
        keybrake_factory, stripe_secret, tmp_path):
    """A metered body above the replay buffer goes out on a pooled connection; the vendor
    reads it whole and takes longer than the read timeout. The agent gets 504
    upstream_timeout, the vendor got the request exactly once (never again on another
    pooled connection: it may be working on it, and a second copy would be paid twice
    while metered once), and the key is charged the reservation."""
    _SlowForBigBodies.big_requests = []
    vendor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowForBigBodies)
    threading.Thread(target=vendor.serve_forever, daemon=True).start()
    try:
        config = write_config(tmp_path / "conf", upstream={"read_timeout_ms": 1000})
        kb = keybrake_factory({"stripe": f"http://127.0.0.1:{vendor.server_address[1]}"}, config=config)
        t = kb.create_tenant()
        t.put_credential("stripe", stripe_secret)
        key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        fields = "&".join(f"metadata[field_{i:03d}]={secrets.token_hex(500)}" for i in range(80))
        big = f"amount=100&currency=usd&{fields}".encode()
        assert len(big) > 64 * 1024 + 1000
        # Several pooled connections to the vendor, for bodies sent whole.
        with ThreadPoolExecutor(6) as pool:
            fast = list(pool.map(lambda _: kb.proxy("POST", PI, key=key["token"], headers=form,
                                                     data=big), range(12)))
        assert [r.status_code for r in fast] == [200] * 12, [r.text for r in fast]
        slow = big.replace(b"amount=100&", b"amount=700&metadata[slow]=yes&")
        r = kb.proxy("POST", PI, key=key["token"], headers=form, data=slow)
        assert_denied(r, 504, "upstream_timeout")
        time.sleep(1.5)
        assert _SlowForBigBodies.big_requests == [len(slow)]
        t.wait_spent(key["id"], Decimal(12) + Decimal(7))
    finally:
        vendor.shutdown()
        vendor.server_close()


class _ActsThenDropsADelete(http.server.BaseHTTPRequestHandler):
    """A vendor billing per request whose first DELETE is acted on, then its connection
    drops before any answer (a vendor restarting, a load balancer cutting idle links)."""
    protocol_version = "HTTP/1.1"
    deletes: list = []

    def log_message(self, *args):
        pass

    def _answer(self):
        raw = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._answer()

    def do_DELETE(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).deletes.append(self.path)
        if len(type(self).deletes) == 1:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._answer()


def test_a_priced_call_written_whole_is_never_sent_again_on_another_connection(
        keybrake_factory, tmp_path):
    """A vendor that bills every request (`cost_per_request_usd`). A DELETE (idempotent by
    the RFC, so a proxy's default would send it again) goes out whole on a pooled
    connection, the vendor acts on it and the connection drops unanswered: the agent gets
    502 upstream_unavailable, the vendor got it once (a second copy would be billed twice
    and metered once), and the key is charged for it (it may have been acted on)."""
    _ActsThenDropsADelete.deletes = []
    vendor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ActsThenDropsADelete)
    vendor.daemon_threads = True
    threading.Thread(target=vendor.serve_forever, daemon=True).start()
    try:
        config = write_config(tmp_path / "conf")
        with open(tmp_path / "conf" / "vendors.yaml", "a") as f:
            f.write('\nacme:\n  upstream: "https://api.acme.example"\n  auth: bearer\n'
                    '  strip_headers: [authorization, x-api-key, proxy-authorization, cookie]\n'
                    '  cost_per_request_usd: "1"\n')
        kb = keybrake_factory({"acme": f"http://127.0.0.1:{vendor.server_address[1]}"}, config=config)
        t = kb.create_tenant()
        t.put_credential("acme", "acme_secret_" + secrets.token_hex(12))
        key = t.issue_key(vendor="acme", allowed_endpoints=["GET /v1/things", "DELETE /v1/things/*"],
                          daily_usd_cap=10)
        # A first call leaves a pooled connection to the vendor behind.
        assert kb.proxy("GET", "/acme/v1/things", key=key["token"]).status_code == 200
        time.sleep(0.2)
        r = kb.proxy("DELETE", "/acme/v1/things/th_1", key=key["token"])
        assert_denied(r, 502, "upstream_unavailable")
        time.sleep(0.5)
        assert _ActsThenDropsADelete.deletes == ["/v1/things/th_1"]
        t.wait_spent(key["id"], Decimal(2))
    finally:
        vendor.shutdown()
        vendor.server_close()


class _HopByHopAnswers(http.server.BaseHTTPRequestHandler):
    """A vendor whose answers carry hop-by-hop headers, and one its Connection names."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        raw = b'{"object":"list","data":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Connection", "keep-alive, x-vendor-hop")
        self.send_header("Keep-Alive", "timeout=1")
        self.send_header("Proxy-Authenticate", "Basic realm=vendor")
        self.send_header("X-Vendor-Hop", "1")
        self.send_header("X-Vendor-End", "kept")
        self.end_headers()
        self.wfile.write(raw)


def test_hop_by_hop_headers_of_a_vendors_answer_are_not_passed_on(keybrake_factory, stripe_secret):
    """The vendor's Keep-Alive, Proxy-Authenticate and the headers its Connection names
    are the vendor connection's, not the client's (RFC 9110 §7.6.1): dropped; its
    end-to-end headers pass."""
    vendor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HopByHopAnswers)
    threading.Thread(target=vendor.serve_forever, daemon=True).start()
    try:
        kb = keybrake_factory({"stripe": f"http://127.0.0.1:{vendor.server_address[1]}"})
        t = kb.create_tenant()
        t.put_credential("stripe", stripe_secret)
        key = t.issue_key(allowed_endpoints=["GET /v1/customers"], daily_usd_cap=1)
        r = kb.proxy("GET", "/stripe/v1/customers", key=key["token"])
        assert r.status_code == 200, r.text
        assert r.headers.get("x-vendor-end") == "kept"
        for hop in ("keep-alive", "proxy-authenticate", "x-vendor-hop"):
            assert hop not in {h.lower() for h in r.headers}, r.headers
    finally:
        vendor.shutdown()
        vendor.server_close()


@pytest.mark.parametrize("size_kib", [100, 900])
def test_metered_body_larger_than_pingoras_replay_buffer_reaches_stripe_byte_for_byte(
        keybrake, tenant, fake_stripe, size_kib):
    """A metered body above Pingora's 64 KiB replay buffer but under the 1 MiB limit is
    read, metered and forwarded whole, byte for byte, and the agent gets Stripe's answer
    with the key id header."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    fields = "&".join(f"metadata[field_{i:03d}]={secrets.token_hex(500)}"
                      for i in range(size_kib * 1024 // 1021))
    body = f"amount=700&currency=usd&{fields}".encode()
    assert len(body) > 64 * 1024 + 1000
    r = keybrake.proxy("POST", PI, key=key["token"], data=body,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert as_json(r)["object"] == "payment_intent"
    assert r.headers.get("x-keybrake-key-id") == key["id"]
    assert fake_stripe.received()[-1].body == body
    tenant.wait_spent(key["id"], Decimal(7))


def test_large_json_body_is_converted_metered_and_forwarded_whole(keybrake, tenant, fake_stripe):
    """A ~200 KiB JSON payment (the seed's shape with a large metadata object) reaches
    Stripe as one form-encoded body with every field, and is metered."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    metadata = {f"k{i:03d}": secrets.token_hex(500) for i in range(200)}
    r = requests.post(
        f"{keybrake.proxy_url}{PI}",
        headers={"Authorization": f"Bearer {key['token']}", "Content-Type": "application/json"},
        data=json.dumps({"amount": 900, "currency": "usd", "metadata": metadata}),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    vendor = fake_stripe.received()[-1]
    assert len(vendor.body) > 200_000
    form = dict(vendor.form)
    assert form["amount"] == "900" and form["currency"] == "usd"
    assert all(form[f"metadata[{k}]"] == v for k, v in metadata.items())
    tenant.wait_spent(key["id"], Decimal(9))


def test_500_kib_unmetered_body_reaches_stripe_byte_for_byte(keybrake, tenant, fake_stripe):
    """A 500 KiB body to an unmetered, allowlisted endpoint (POST /v1/customers) is
    forwarded unchanged, byte for byte, and costs nothing."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/customers"])
    body = ("name=big&description=" + "d" * (500 * 1024)).encode()
    r = keybrake.proxy("POST", "/stripe/v1/customers", key=key["token"], data=body,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert fake_stripe.received()[-1].body == body
    tenant.wait_spent(key["id"], Decimal(0))


# --------------------------------------------------------------------------- currencies


def usd_of(amount: int, currency: str) -> Decimal:
    decimals, rate = currency_rate(currency)
    usd = Decimal(amount) / (Decimal(10) ** decimals) * rate
    return usd.quantize(Decimal("0.000001"), rounding=ROUND_CEILING)


@pytest.mark.parametrize("currency,amount", [("jpy", 1500), ("kwd", 1000), ("eur", 1000), ("usd", 999)])
def test_amounts_are_converted_to_usd_with_the_currency_table(keybrake, tenant, fake_stripe, currency, amount):
    """Zero-decimal (JPY), three-decimal (KWD) and two-decimal currencies are converted to
    USD with conf/currencies.yaml; a second payment that would pass the cap is refused."""
    usd = usd_of(amount, currency)
    cap = (usd * Decimal("1.5")).quantize(Decimal("0.01"))
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=float(cap))
    assert pay(keybrake, key["token"], amount, currency).status_code == 200
    tenant.wait_spent(key["id"], usd)
    assert_denied(pay(keybrake, key["token"], amount, currency), 429, "cap_exhausted")
    assert len(fake_stripe.received()) == 1


def test_unsupported_currency_is_refused(keybrake, tenant, fake_stripe):
    """A currency absent from the currency table is 400 unsupported_currency."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"])
    assert_denied(pay(keybrake, key["token"], 1000, "xyz"), 400, "unsupported_currency")
    assert fake_stripe.received() == []


@pytest.mark.parametrize(
    "query,body",
    [
        ("", "amount=100&currency=usd&amount=5000"),
        ("", "amount=2500&currency=jpy&currency=usd"),
        ("", "amount=99999999999999999999999&currency=usd"),
        ("?amount=5000&currency=usd", ""),
        ("?amount=5000", "currency=usd"),
        ("", "amount=100&currency=usd&+amount=5000"),
        ("", "amount=100&currency=usd&amount%5D=5000"),
        ("", "amount=100&currency=usd&%5Bamount%5D=5000"),
        ("", "amount=100&currency=usd;amount=5000"),
        ("?amount=5000", "amount=100&currency=usd"),
        ("?%20amount=5000", "amount=100&currency=usd"),
        ("", '{"amount":500000,"currency":"usd","x":"&amount=1&currency=usd&"}'),
    ],
    ids=["duplicate-amount", "duplicate-currency", "huge-amount", "amount-in-query", "amount-only-in-query",
         "space-aliased-amount", "bracket-aliased-amount", "bracketed-amount", "semicolon-amount",
         "amount-in-query-and-body", "aliased-amount-in-query", "json-declared-as-form"],
)
def test_ambiguous_amounts_cannot_slip_under_the_cap(keybrake, tenant, fake_stripe, query, body):
    """A body whose charge the vendor could read differently from Keybrake (duplicate
    amount or currency, a name Stripe's form parser may fold into `amount`, amount in the
    query string, overflowing amount) is refused
    (400) or metered at its worst case (429 against a $20 cap) — never forwarded."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=20)
    r = keybrake.proxy("POST", PI + query, key=key["token"], data=body.encode(),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code in (400, 429), f"{r.status_code}: {r.text[:300]}"
    assert denial(r)["code"] in ("invalid_amount", "amount_required", "unsupported_currency", "cap_exhausted")
    assert fake_stripe.received() == []


@pytest.mark.parametrize(
    "body,code",
    [
        ({"currency": "usd"}, "amount_required"),
        ({"amount": "abc", "currency": "usd"}, "invalid_amount"),
        ({"amount": "-100", "currency": "usd"}, "invalid_amount"),
        ({"amount": "12.5", "currency": "usd"}, "invalid_amount"),
    ],
)
def test_metered_request_without_a_valid_amount_is_refused(keybrake, tenant, fake_stripe, body, code):
    """A metered Stripe call must carry a valid integer amount: missing → 400
    amount_required, malformed → 400 invalid_amount; nothing is forwarded."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"])
    assert_denied(keybrake.proxy("POST", PI, key=key["token"], data=body), 400, code)
    assert_denied(keybrake.proxy("POST", PI, key=key["token"], json=body), 400, code)
    assert fake_stripe.received() == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"},
        {"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "identity"},
    ],
    ids=["multipart", "text-plain", "gzip", "identity-encoding"],
)
def test_metered_bodies_other_than_a_plain_form_or_json_are_refused(keybrake, tenant, fake_stripe, headers):
    """Only a plain form (or JSON) body is metered: another content type or any
    Content-Encoding could hide another amount from Keybrake's reading. 400
    invalid_amount, never forwarded."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=1000)
    r = keybrake.proxy("POST", PI, key=key["token"], data=b"amount=100&currency=usd", headers=headers)
    assert_denied(r, 400, "invalid_amount")
    assert fake_stripe.received() == []


@pytest.mark.parametrize("nested_key", ["", "]", " "])
def test_json_cannot_smuggle_a_second_amount_through_a_nested_key(keybrake, tenant, fake_stripe, nested_key):
    """A JSON body is metered from the form Stripe will receive: a nested object whose
    key flattens to a name Stripe's parser may read as `amount` (`[amount]`,
    `][amount]`) makes the amount ambiguous: 400 invalid_amount, never forwarded."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=1000)
    body = {"amount": 100, "currency": "usd", nested_key: {"amount": 99999999}}
    assert_denied(keybrake.proxy("POST", PI, key=key["token"], json=body), 400, "invalid_amount")
    assert fake_stripe.received() == []


# --------------------------------------------------------------------------- operations


def test_logs_never_contain_tokens_or_secrets(keybrake, tenant, fake_stripe, stripe_secret):
    """The access log has a JSON line per proxied request naming the key id and label,
    and no output ever contains a vault key, the vendor secret or an API token."""
    key = tenant.issue_key(label="log-check", allowed_endpoints=["GET /v1/customers"])
    assert keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"]).status_code == 200
    assert_denied(keybrake.proxy("GET", "/stripe/v1/charges", key=key["token"]), 403, "endpoint_not_allowed")
    assert_denied(keybrake.proxy("GET", "/stripe/v1/customers", key=key["token"] + "x"), 401, "invalid_key")

    def access_lines():
        out = []
        for line in keybrake.logs().splitlines():
            line = line.strip()
            if line.startswith("{") and key["id"] in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    assert wait_until(lambda: len(access_lines()) >= 2, timeout=5), keybrake.logs()[-2000:]
    assert any("log-check" in json.dumps(x) for x in access_lines())
    logs = keybrake.logs()
    for secret in (key["token"], key["token"][3:], stripe_secret, tenant.token, keybrake.admin_token):
        assert secret not in logs
    assert not re.search(r"vk_ey[A-Za-z0-9_-]{20,}", logs)


def test_a_secret_in_the_query_string_never_reaches_the_logs(keybrake_factory):
    """Pingora's `Fail to proxy` error line names the request: it gives the method and
    canonical path only, never the query string (which may carry a token) nor headers."""
    kb = keybrake_factory({"stripe": f"http://127.0.0.1:{free_port()}"})
    t = kb.create_tenant()
    t.put_credential("stripe", "sk_test_" + secrets.token_hex(16))
    key = t.issue_key(allowed_endpoints=["GET /v1/**"], daily_usd_cap=1)
    leaked = "sk_test_secretvalue" + secrets.token_hex(8)
    r = kb.proxy("GET", f"/stripe/v1/customers?access_token={leaked}", key=key["token"])
    assert_denied(r, 502, "upstream_unavailable")
    # The failure is logged: wait for the line that names the request.
    assert wait_until(lambda: "GET /stripe/v1/customers" in kb.logs(), timeout=5), kb.logs()[-2000:]
    logs = kb.logs()
    assert leaked not in logs, [line for line in logs.splitlines() if leaked in line]
    assert "access_token" not in logs


def test_metrics_count_requests_by_decision(keybrake, tenant, fake_stripe):
    """GET /metrics (metrics listener) exposes keybrake_requests_total by vendor and
    decision and keybrake_keys_issued_total."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=1)
    assert pay(keybrake, key["token"], 100).status_code == 200
    assert_denied(pay(keybrake, key["token"], 100), 429, "cap_exhausted")
    # A request is counted once its answer is sent (Pingora's logging phase): wait for it.
    scraped = {}

    def counted():
        r = requests.get(f"{keybrake.metrics_url}/metrics", timeout=10)
        assert r.status_code == 200
        scraped["text"] = r.text
        return 'decision="cap_exhausted"' in r.text

    assert wait_until(counted, timeout=5), scraped.get("text")
    text = scraped["text"]
    assert re.search(r'keybrake_requests_total\{[^}]*vendor="stripe"[^}]*decision="allowed"[^}]*\}\s+1', text) or \
        re.search(r'keybrake_requests_total\{[^}]*decision="allowed"[^}]*vendor="stripe"[^}]*\}\s+1', text), text
    assert "keybrake_keys_issued_total" in text
    assert re.search(r'keybrake_spend_usd_total\{[^}]*vendor="stripe"[^}]*\}\s+1(\.0+)?\b', text), text


# --------------------------------------------------------------------------- money endpoints (issue 13)


def _customer_with_card(fake, secret):
    direct, pm = _direct_payment_method(fake, secret)
    customer = direct.post(f"{fake.url}/v1/customers", data={"payment_method": pm}, timeout=10).json()
    direct.post(f"{fake.url}/v1/customers/{customer['id']}", timeout=10,
                data={"invoice_settings[default_payment_method]": pm})
    return direct, customer["id"]


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/checkout/sessions"),
    ("POST", "/v1/payment_links"),
    ("POST", "/v1/invoices"),
    ("POST", "/v1/subscriptions/sub_1"),
    ("POST", "/v1/subscription_items"),
    ("POST", "/v1/subscription_schedules"),
    ("POST", "/v1/quotes/qt_1/accept"),
    ("POST", "/v1/topups"),
    ("POST", "/v1/application_fees/fee_1/refunds"),
    ("POST", "/v1/treasury/outbound_payments"),
    ("POST", "/v1/issuing/authorizations/iauth_1/approve"),
    ("POST", "/v1/charges/ch_1/capture"),
    ("DELETE", "/v1/subscriptions/sub_1"),
    ("POST", "/v2/money_management/outbound_payments"),
])
def test_endpoints_that_can_move_money_unmetered_are_refused(keybrake, tenant, fake_stripe, method, path):
    """A key allowed everything (`/v1/**`, `/v2/**`) with a cap never reaches an endpoint
    that can move money unless Keybrake meters it: 403 endpoint_unmetered, nothing sent.
    Issuing such a key is answered with a warning naming the pattern."""
    key = tenant.issue_key(allowed_endpoints=["/v1/**", "/v2/**"], daily_usd_cap=1)
    assert len(key.get("warnings", [])) == 2, key
    assert "endpoint_unmetered" in key["warnings"][0]
    assert_denied(keybrake.proxy(method, f"/stripe{path}", key=key["token"], data={"amount": 1}),
                  403, "endpoint_unmetered")
    assert fake_stripe.received() == []


def test_a_key_with_only_metered_or_free_endpoints_gets_no_warning(tenant):
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents", "POST /v1/customers", "GET /v1/**"])
    assert "warnings" not in key


def test_a_pattern_written_with_the_proxy_prefix_is_warned_about(keybrake, tenant, fake_stripe):
    """Patterns are the vendor's own paths: "POST /stripe/v1/payment_intents" matches no
    call (the proxy strips /stripe before matching). Issuing says so instead of the
    unmetered-endpoint warning, and the call is refused with a message that says how
    patterns are written."""
    key = tenant.issue_key(allowed_endpoints=["POST /stripe/v1/payment_intents"], daily_usd_cap=5)
    assert len(key["warnings"]) == 1 and "prefix /stripe" in key["warnings"][0], key
    # Listed twice: warned about once.
    twice = tenant.issue_key(allowed_endpoints=["POST /stripe/v1/payment_intents"] * 2, daily_usd_cap=5)
    assert twice["warnings"] == key["warnings"], twice
    r = keybrake.proxy("POST", "/stripe/v1/payment_intents", key=key["token"],
                       data={"amount": 100, "currency": "usd"})
    assert_denied(r, 403, "endpoint_not_allowed")
    assert "POST /v1/payment_intents" in r.json()["message"]
    assert fake_stripe.received() == []
    # An API docs placeholder is a literal: the warning says how a segment is matched.
    key = tenant.issue_key(allowed_endpoints=["GET /v1/payment_intents/{id}"], daily_usd_cap=5)
    assert len(key["warnings"]) == 1 and "`*`" in key["warnings"][0], key


def test_a_subscription_costs_its_first_period_and_is_refused_past_the_cap(
        keybrake, tenant, fake_stripe, stripe_secret):
    """POST /v1/subscriptions is metered from its items: each price is read from Stripe
    and price × quantity is reserved before forwarding. A $1,000,000/month plan on a $1
    key is 429 cap_exhausted and never created; 2 × $0.40 is charged $0.80."""
    direct, customer = _customer_with_card(fake_stripe, stripe_secret)
    big = direct.post(f"{fake_stripe.url}/v1/prices", timeout=10,
                      data={"unit_amount": 100_000_000, "currency": "usd"}).json()
    small = direct.post(f"{fake_stripe.url}/v1/prices", timeout=10,
                        data={"unit_amount": 40, "currency": "usd"}).json()
    key = tenant.issue_key(allowed_endpoints=["POST /v1/subscriptions"], daily_usd_cap=1)
    client = stripe_client(keybrake, key["token"])
    with pytest.raises(stripe.StripeError) as info:
        client.v1.subscriptions.create(params={"customer": customer, "items": [{"price": big["id"]}]})
    assert info.value.http_status == 429 and info.value.json_body["code"] == "cap_exhausted"
    assert fake_stripe.received_matching("POST", "/v1/subscriptions") == []
    sub = client.v1.subscriptions.create(params={"customer": customer, "items": [{"price": small["id"], "quantity": 2}]})
    assert sub.status == "active"
    tenant.wait_spent(key["id"], Decimal("0.8"))
    r = keybrake.proxy("POST", "/stripe/v1/subscriptions", key=key["token"],
                       data={"customer": customer, "items[0][price_data][unit_amount]": "1",
                             "items[0][price_data][currency]": "usd"})
    assert_denied(r, 400, "invalid_amount")
    assert len(fake_stripe.received_matching("POST", "/v1/subscriptions")) == 1


def test_a_key_with_nothing_left_makes_stripe_read_nothing_for_a_call_it_is_refused(
        keybrake, tenant, fake_stripe, stripe_secret):
    """A call priced from objects Stripe reads first (a subscription's prices, the invoice
    a pay acts on) is refused before any read when the key has nothing left: a denial
    never reaches the vendor, not even as a lookup carrying the tenant's secret, however
    many prices the call names. A key with room still has its prices read and is charged."""
    direct, customer = _customer_with_card(fake_stripe, stripe_secret)
    prices = [direct.post(f"{fake_stripe.url}/v1/prices", timeout=10,
                          data={"unit_amount": 40, "currency": "usd"}).json()["id"] for _ in range(3)]
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents", "POST /v1/subscriptions",
                                              "POST /v1/invoices/*/pay"], daily_usd_cap=1)
    assert keybrake.proxy("POST", PI, key=key["token"], data={"amount": 100, "currency": "usd"}).status_code == 200
    before = len(fake_stripe.received())
    body = {"customer": customer, **{f"items[{i}][price]": p for i, p in enumerate(prices)}}
    for _ in range(3):
        r = keybrake.proxy("POST", "/stripe/v1/subscriptions", key=key["token"], data=body)
        assert_denied(r, 429, "cap_exhausted")
        r = keybrake.proxy("POST", "/stripe/v1/invoices/in_123/pay", key=key["token"])
        assert_denied(r, 429, "cap_exhausted")
    assert fake_stripe.received()[before:] == [], "the vendor was asked something for refused calls"
    # The same call on a key with room: its three prices are read, and it is charged.
    roomy = tenant.issue_key(allowed_endpoints=["POST /v1/subscriptions"], daily_usd_cap=5)
    r = keybrake.proxy("POST", "/stripe/v1/subscriptions", key=roomy["token"], data=body)
    assert r.status_code == 200, r.text
    assert len([x for x in fake_stripe.received()[before:] if x.method == "GET"]) == 3
    tenant.wait_spent(roomy["id"], Decimal("1.2"))


class SlowPrices(JsonVendor):
    """A Stripe whose prices ($0.40 each) answer after 300 ms, counting how many of its
    price reads were in flight at once; a subscription is created as sent."""

    lock = threading.Lock()
    in_flight = 0
    most = 0
    reads: list[str] = []

    def do_GET(self):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most = max(cls.most, cls.in_flight)
            cls.reads.append(self.path)
        time.sleep(0.3)
        with cls.lock:
            cls.in_flight -= 1
        self._send({"id": self.path.rsplit("/", 1)[1], "object": "price", "unit_amount": 40, "currency": "usd"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send({"id": "sub_" + secrets.token_hex(6), "object": "subscription", "status": "active"})


def test_a_subscriptions_prices_are_read_once_each_and_at_the_same_time(keybrake_factory, stripe_secret):
    """Five items naming four prices (one twice): each price is read from Stripe once, and
    the reads are sent together, so the call waits for one vendor round trip rather than
    one per item; it is charged Σ price × quantity."""
    SlowPrices.reads, SlowPrices.most = [], 0
    vendor = start_vendor(SlowPrices)
    kb = keybrake_factory({"stripe": f"http://127.0.0.1:{vendor.server_address[1]}"})
    try:
        t = kb.create_tenant()
        t.put_credential("stripe", stripe_secret)
        key = t.issue_key(allowed_endpoints=["POST /v1/subscriptions"], daily_usd_cap=10)
        prices = ["price_a", "price_b", "price_c", "price_d", "price_a"]
        body = {"customer": "cus_1", **{f"items[{i}][price]": p for i, p in enumerate(prices)},
                "items[1][quantity]": "3"}
        r = kb.proxy("POST", "/stripe/v1/subscriptions", key=key["token"], data=body)
        assert r.status_code == 200, r.text
        assert sorted(SlowPrices.reads) == [f"/v1/prices/price_{c}" for c in "abcd"], SlowPrices.reads
        assert SlowPrices.most == 4, f"at most {SlowPrices.most} price reads were in flight at once"
        t.wait_spent(key["id"], Decimal("0.4") * 7)
    finally:
        vendor.shutdown()


@pytest.mark.parametrize("query", [
    "add_invoice_items[0][price]=PRICE&add_invoice_items[0][quantity]=1000",
    "backdate_start_date=1600000000",
    "currency=eur",
    "default_tax_rates[0]=txr_1",
    "plan=PRICE&quantity=1000",
    "items[1][price]=PRICE",
    "tax_percent=100",
])
def test_a_subscription_cannot_add_to_its_charge_through_the_query_string(
        keybrake, tenant, fake_stripe, stripe_secret, query):
    """What a subscription's body may not carry (extra invoice items, a backdated start,
    another currency, tax, the legacy single plan) it may not carry in the query string
    either, which Stripe reads too: 400 invalid_amount, nothing created. A query that only
    expands the answer is fine."""
    direct, customer = _customer_with_card(fake_stripe, stripe_secret)
    price = direct.post(f"{fake_stripe.url}/v1/prices", timeout=10,
                        data={"unit_amount": 40, "currency": "usd"}).json()["id"]
    key = tenant.issue_key(allowed_endpoints=["POST /v1/subscriptions"], daily_usd_cap=5)
    body = {"customer": customer, "items[0][price]": price}
    r = keybrake.proxy("POST", "/stripe/v1/subscriptions?" + query.replace("PRICE", price),
                       key=key["token"], data=body)
    assert_denied(r, 400, "invalid_amount")
    assert fake_stripe.received_matching("POST", "/v1/subscriptions") == []
    r = keybrake.proxy("POST", "/stripe/v1/subscriptions?expand[]=latest_invoice",
                       key=key["token"], data=body)
    assert r.status_code == 200, r.text
    tenant.wait_spent(key["id"], Decimal("0.4"))


def test_a_customer_balance_cannot_be_set_through_a_capped_key(keybrake, tenant, fake_stripe):
    """A customer's positive balance is added to its next invoice, which no meter sees:
    creating or updating a customer is free, but not with a `balance` (body, JSON or
    query string): 403 endpoint_unmetered, never forwarded. Nor with a new `source` on an
    existing customer (Stripe then retries its past-due invoices). Without them, it works."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/customers", "POST /v1/customers/*"],
                           daily_usd_cap=1)
    client = stripe_client(keybrake, key["token"])
    with pytest.raises(stripe.StripeError) as info:
        client.v1.customers.create(params={"email": "a@example.com", "balance": 1_000_000})
    assert info.value.http_status == 403 and info.value.json_body["code"] == "endpoint_unmetered"
    customer = client.v1.customers.create(params={"email": "a@example.com"})
    for path, kwargs in [
        (f"/stripe/v1/customers/{customer.id}", {"data": {"balance": "1000000"}}),
        (f"/stripe/v1/customers/{customer.id}", {"json": {"name": "x", "balance": 1000000}}),
        (f"/stripe/v1/customers/{customer.id}?balance=1000000", {"data": {"name": "x"}}),
        (f"/stripe/v1/customers/{customer.id}", {"data": b"name=x&b%61lance=1000000",
                                                 "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
        ("/stripe/v1/customers", {"data": b"email=b@example.com;balance=1000000",
                                  "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
        # The names of older API versions, which a client picks with Stripe-Version.
        (f"/stripe/v1/customers/{customer.id}", {"data": {"account_balance": "1000000"},
                                                 "headers": {"Stripe-Version": "2019-10-08"}}),
        ("/stripe/v1/customers", {"data": {"email": "c@example.com", "plan": "plan_big", "quantity": "9"},
                                  "headers": {"Stripe-Version": "2017-08-15"}}),
        # A new source on an existing customer retries its past-due subscriptions' invoices.
        (f"/stripe/v1/customers/{customer.id}", {"data": {"source": "tok_visa"}}),
        (f"/stripe/v1/customers/{customer.id}", {"data": {"card": "tok_visa"},
                                                 "headers": {"Stripe-Version": "2014-10-07"}}),
    ]:
        assert_denied(keybrake.proxy("POST", path, key=key["token"], **kwargs), 403, "endpoint_unmetered")
    assert len(fake_stripe.received_matching("POST", "/v1/customers")) == 1
    assert fake_stripe.received_matching("POST", f"/v1/customers/{customer.id}") == []
    updated = client.v1.customers.update(customer.id, params={"name": "Ada"})
    assert updated.name == "Ada"
    assert Decimal(str(tenant.get_key(key["id"])["spent_today_usd"])) == 0


@pytest.mark.parametrize("extra", [
    {"quantity": "100000"},
    {"unit_amount_decimal": "100000"},
    {"price_data[unit_amount]": "100000", "price_data[product]": "prod_1"},
    {"tax_rates[0]": "txr_1"},
])
def test_an_invoice_item_costs_its_amount_and_nothing_can_multiply_it(
        keybrake, tenant, fake_stripe, stripe_secret, extra):
    """An invoice item is metered from its `amount`: a quantity, a price or a tax that
    would make it cost more is refused (403 endpoint_unmetered), never forwarded."""
    direct, customer = _customer_with_card(fake_stripe, stripe_secret)
    key = tenant.issue_key(allowed_endpoints=["POST /v1/invoiceitems"], daily_usd_cap=5)
    body = {"customer": customer, "amount": "1", "currency": "usd", **extra}
    assert_denied(keybrake.proxy("POST", "/stripe/v1/invoiceitems", key=key["token"], data=body),
                  403, "endpoint_unmetered")
    assert fake_stripe.received_matching("POST", "/v1/invoiceitems") == []


@pytest.mark.parametrize("path", ["/stripe/v1/products", "/stripe/v1/payment_intents"])
def test_a_json_body_whose_form_outgrows_the_body_limit_is_413(keybrake, tenant, fake_stripe, path):
    """A JSON body is converted to Stripe's form, where every nested value repeats its
    parents' names: 40 KB of nested arrays would make ~7 MB. The form is held to the body
    limit (1 MiB): 413 body_too_large, nothing forwarded."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/products", "POST /v1/payment_intents"],
                           daily_usd_cap=5)
    depth = 50
    body = ('{"amount":100,"currency":"usd","metadata":' + "[" * depth
            + ",".join(["1"] * 20_000) + "]" * depth + "}")
    assert len(body) < 50_000
    r = keybrake.proxy("POST", path, key=key["token"], data=body.encode(),
                       headers={"Content-Type": "application/json"})
    assert_denied(r, 413, "body_too_large")
    assert fake_stripe.received() == []


def test_paying_an_invoice_reserves_its_amount_first(keybrake, tenant, fake_stripe, stripe_secret):
    """POST /v1/invoices/{id}/pay: the invoice's amount due is read and reserved before
    forwarding; a $12 invoice on a $10 key is refused (429, never forwarded), on a $20 key
    paid and charged $12 once (paying it again costs nothing more)."""
    direct, customer = _customer_with_card(fake_stripe, stripe_secret)
    item = direct.post(f"{fake_stripe.url}/v1/invoiceitems", timeout=10,
                       data={"customer": customer, "amount": 1200, "currency": "usd"})
    assert item.status_code == 200, item.text
    invoice = direct.post(f"{fake_stripe.url}/v1/invoices", data={"customer": customer}, timeout=10).json()
    assert invoice["amount_due"] == 1200, invoice
    pay_path = f"/stripe/v1/invoices/{invoice['id']}/pay"
    small = tenant.issue_key(allowed_endpoints=["POST /v1/invoices/*/pay"], daily_usd_cap=10)
    assert_denied(keybrake.proxy("POST", pay_path, key=small["token"]), 429, "cap_exhausted")
    assert fake_stripe.received_matching("POST", f"/v1/invoices/{invoice['id']}/pay") == []
    key = tenant.issue_key(allowed_endpoints=["POST /v1/invoices/*/pay"], daily_usd_cap=20)
    r = keybrake.proxy("POST", pay_path, key=key["token"])
    assert r.status_code == 200 and r.json()["status"] == "paid", r.text
    tenant.wait_spent(key["id"], Decimal(12))
    again = keybrake.proxy("POST", pay_path, key=key["token"])
    assert again.status_code == 400, again.text  # already paid: Stripe refuses
    tenant.wait_spent(key["id"], Decimal(12))


@pytest.mark.parametrize("path,fields", [
    ("/v1/charges", {"amount": 700, "currency": "usd", "source": None}),
    ("/v1/transfers", {"amount": 900, "currency": "usd", "destination": "acct_1DEST"}),
    ("/v1/payouts", {"amount": 1100, "currency": "eur"}),
    ("/v1/invoiceitems", {"amount": 1300, "currency": "usd", "customer": None}),
])
def test_other_request_metered_endpoints_are_charged_and_capped(
        keybrake, tenant, fake_stripe, stripe_secret, path, fields):
    """Charges, transfers, payouts and invoice items are metered from their body: the
    first call is charged its amount, a second that would pass the cap (1.5 times the
    amount) is 429 cap_exhausted and never forwarded."""
    fields = dict(fields)
    if "customer" in fields:
        _, fields["customer"] = _customer_with_card(fake_stripe, stripe_secret)
    if "source" in fields:
        _, fields["source"] = _direct_payment_method(fake_stripe, stripe_secret)
    usd = usd_of(fields["amount"], fields["currency"])
    cap = (usd * Decimal("1.5")).quantize(Decimal("0.01"))
    key = tenant.issue_key(allowed_endpoints=[f"POST {path}"], daily_usd_cap=float(cap))
    r = keybrake.proxy("POST", f"/stripe{path}", key=key["token"], data=fields)
    assert r.status_code == 200, r.text
    tenant.wait_spent(key["id"], usd)
    assert_denied(keybrake.proxy("POST", f"/stripe{path}", key=key["token"], data=fields), 429, "cap_exhausted")
    assert len(fake_stripe.received_matching("POST", path)) == 1


def test_a_vendor_5xx_keeps_the_spend(keybrake, tenant, fake_stripe):
    """A 500 from Stripe is an unknown outcome (it may have charged): the payment stays
    counted, so a second one that would pass the cap is refused."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=20)
    r = keybrake.proxy("POST", PI, key=key["token"], data={"amount": 1500, "currency": "usd"},
                       headers={"x-fake-status": "500"})
    assert r.status_code == 500, r.text
    tenant.wait_spent(key["id"], Decimal(15))
    assert_denied(pay(keybrake, key["token"], 1500), 429, "cap_exhausted")


def test_an_sdk_retry_with_the_same_idempotency_key_is_not_charged_again(keybrake, tenant, fake_stripe):
    """stripe-python retries a POST whose connection dropped with the same
    Idempotency-Key, and Stripe replays its first answer: the retry is forwarded but not
    charged again. Stripe processed the payment once; the key spent $15 of $20."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=20)
    client = stripe.StripeClient(api_key=key["token"], base_addresses={"api": f"{keybrake.proxy_url}/stripe"},
                                 max_network_retries=2)
    intent = client.v1.payment_intents.create(
        params={"amount": 1500, "currency": "usd", "metadata": {"fake_drop": "once"}})
    assert intent.amount == 1500
    attempts = fake_stripe.received_matching("POST", "/v1/payment_intents")
    assert len(attempts) >= 2 and len({r.headers.get("idempotency-key") for r in attempts}) == 1
    tenant.wait_spent(key["id"], Decimal(15))
    # Another body under the same Idempotency-Key is charged (and refused here).
    r = keybrake.proxy("POST", PI, key=key["token"], data={"amount": 1000, "currency": "usd"},
                       headers={"Idempotency-Key": attempts[0].headers["idempotency-key"]})
    assert_denied(r, 429, "cap_exhausted")


def test_one_idempotency_key_under_the_other_account_header_is_charged_again(keybrake, tenant, fake_stripe):
    """The same payment and Idempotency-Key, naming the same connected account first with
    Stripe-Account and then with Stripe-Context: whether Stripe keeps one key apart for
    the two headers is not known, so the second is reserved as a new payment (more, never
    less); this Stripe answers it as a replay (`Idempotent-Replayed: true`), so nothing
    moved and the reservation goes back. Sent again exactly as the first, it is a free
    replay. The key spent $10, what Stripe charged."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=50,
                           stripe_accounts=["acct_1ALLOWED"])
    idem = f"idem-{secrets.token_hex(4)}"
    body = {"amount": 1000, "currency": "usd"}
    replays = False
    for header in ("Stripe-Account", "Stripe-Context", "Stripe-Account"):
        r = keybrake.proxy("POST", PI, key=key["token"], data=body,
                           headers={header: "acct_1ALLOWED", "Idempotency-Key": idem})
        assert r.status_code == 200, r.text
        assert r.headers.get("idempotent-replayed") == (None if header == "Stripe-Account" and not replays
                                                        else "true")
        replays = True
    tenant.wait_spent(key["id"], Decimal(10))


def test_a_retry_after_the_tenant_replaced_its_stripe_secret_is_charged_again(
        keybrake, tenant, fake_stripe, stripe_secret):
    """Stripe keeps idempotency keys per account and mode: once the tenant has replaced
    its secret (another account, live for test), a retry with the first call's
    Idempotency-Key is a new payment there, so it is charged again. A $1 key pays $0.60
    once; the same retry, free before the switch, is refused at the cap after it."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=1)
    body, idem = {"amount": 60, "currency": "usd"}, {"Idempotency-Key": f"idem-{secrets.token_hex(4)}"}
    assert keybrake.proxy("POST", PI, key=key["token"], data=body, headers=idem).status_code == 200
    r = keybrake.proxy("POST", PI, key=key["token"], data=body, headers=idem)
    assert r.status_code == 200, r.text   # a free replay under the same secret
    tenant.put_credential("stripe", stripe_secret + "_rotated")
    r = keybrake.proxy("POST", PI, key=key["token"], data=body, headers=idem)
    assert_denied(r, 429, "cap_exhausted")
    tenant.wait_spent(key["id"], Decimal("0.6"))


def test_a_retry_stripe_replays_after_a_restart_is_not_charged_again(keybrake, tenant, fake_stripe):
    """A retry that reaches a process which never saw the first call (serve restarted or
    upgraded, another edge node): Stripe answers it with its first answer and
    `Idempotent-Replayed: true`, having moved nothing, and the retry's reservation goes
    back. The key spent $10 once, as Stripe charged once; a new payment is charged. (The
    retry still needs room under the cap for its reservation: at the cap it is refused.)"""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=25)
    body = {"amount": 1000, "currency": "usd"}
    headers = {"Idempotency-Key": f"retry-{secrets.token_hex(8)}"}
    first = keybrake.proxy("POST", PI, key=key["token"], data=body, headers=headers)
    assert first.status_code == 200, first.text
    tenant.wait_spent(key["id"], Decimal(10))
    keybrake.restart()
    retry = keybrake.proxy("POST", PI, key=key["token"], data=body, headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.json()["id"] == first.json()["id"]
    assert retry.headers.get("idempotent-replayed") == "true"
    tenant.wait_spent(key["id"], Decimal(10))
    assert len([e for e in tenant.audit_all(key_id=key["id"]) if e["decision"] == "allowed"]) == 2
    assert keybrake.proxy("POST", PI, key=key["token"], data=body).status_code == 200
    tenant.wait_spent(key["id"], Decimal(20))
    assert_denied(keybrake.proxy("POST", PI, key=key["token"], data=body), 429, "cap_exhausted")


class AlwaysSaysReplayed(JsonVendor):
    """A vendor whose every answer says `Idempotent-Replayed: true`, or what the request's
    `x-fake-replayed` asks."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"id": f"pi_{secrets.token_hex(6)}", "object": "payment_intent",
                           "amount": 500, "currency": "usd", "status": "requires_payment_method"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Idempotent-Replayed", self.headers.get("x-fake-replayed", "true"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("idempotency_key, replayed", [(None, "true"), ("k-1", "false")])
def test_a_replayed_answer_to_a_call_without_an_idempotency_key_is_charged(
        keybrake_factory, tmp_path, idempotency_key, replayed):
    """Only a request with one `Idempotency-Key` can be replayed, and only
    `Idempotent-Replayed: true` says it was: an answer that says so to a call without
    one, or says `false`, is charged like any other ($5, then $5 more, then refused at
    the $10 cap)."""
    headers = {"x-fake-replayed": replayed}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    vendor = start_vendor(AlwaysSaysReplayed)
    try:
        kb = keybrake_factory({"stripe": f"http://127.0.0.1:{vendor.server_address[1]}"})
        t = kb.create_tenant("replays")
        t.put_credential("stripe", "sk_test_" + secrets.token_hex(12))
        key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
        for n in range(2):
            # Each call its own key, or the proxy itself lets a retry through uncharged.
            if idempotency_key:
                headers["Idempotency-Key"] = f"{idempotency_key}-{n}"
            r = kb.proxy("POST", PI, key=key["token"], data={"amount": 500, "currency": "usd"}, headers=headers)
            assert r.status_code == 200, r.text
        t.wait_spent(key["id"], Decimal(10))
        if idempotency_key:
            headers["Idempotency-Key"] = f"{idempotency_key}-2"
        assert_denied(kb.proxy("POST", PI, key=key["token"], data={"amount": 500, "currency": "usd"},
                               headers=headers), 429, "cap_exhausted")
    finally:
        vendor.shutdown()


def test_a_blank_or_overlong_idempotency_key_is_charged_every_time(keybrake, tenant, fake_stripe):
    """A blank `Idempotency-Key` (or one past Stripe's 255 characters) may be taken by
    the vendor for no key at all, each call a new payment: every one is charged, so a $1
    key pays $0.60 once, then is refused at its cap."""
    for idem in ("", "k" * 256):
        key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=1)
        body = {"amount": 60, "currency": "usd"}
        r = keybrake.proxy("POST", PI, key=key["token"], data=body, headers={"Idempotency-Key": idem})
        assert r.status_code == 200, (repr(idem[:8]), r.text)
        r = keybrake.proxy("POST", PI, key=key["token"], data=body, headers={"Idempotency-Key": idem})
        assert_denied(r, 429, "cap_exhausted")
        tenant.wait_spent(key["id"], Decimal("0.6"))


def test_a_concurrent_duplicate_waits_for_the_first_and_is_not_charged(keybrake, tenant, fake_stripe):
    """Two identical $15 payments with one Idempotency-Key sent together on a $20 key:
    the second waits for the first to settle and then goes through uncharged (Stripe
    replays); both succeed with the same intent and the key spent $15."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=20)
    headers = {"Idempotency-Key": f"idem-{secrets.token_hex(4)}", "x-fake-delay-ms": "700"}

    def send(_):
        r = keybrake.proxy("POST", PI, key=key["token"], data={"amount": 1500, "currency": "usd"}, headers=headers)
        return r.status_code, r.json().get("id")

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(send, range(2)))
    assert [r[0] for r in results] == [200, 200], results
    assert results[0][1] == results[1][1]
    tenant.wait_spent(key["id"], Decimal(15))


def test_a_key_revoked_while_its_bodies_arrive_sends_nothing(keybrake, tenant, fake_stripe):
    """Five payments send their headers and 5 bytes of body; the key is revoked; the
    bodies are then finished: all five are 401 key_revoked and Stripe receives nothing."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    body = b"amount=100&currency=usd"
    socks = []
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", keybrake.proxy_port), timeout=10)
        s.sendall((f"POST {PI} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key['token']}\r\n"
                   f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                  + body[:5])
        socks.append(s)
    time.sleep(0.3)
    assert tenant.revoke(key["id"]).status_code == 200
    assert_denied(pay(keybrake, key["token"], 100), 401, "key_revoked")
    for s in socks:
        s.sendall(body[5:])
    for s in socks:
        answer = read_head(s)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b"key_revoked" in answer or b"content-length" in answer.lower()
    time.sleep(0.3)
    assert fake_stripe.received() == []


def test_underscore_twins_of_checked_headers_are_the_same_header(keybrake, tenant, fake_stripe):
    """`Stripe_Account` is checked like `Stripe-Account` (a CGI-style server reads both
    as one): 403 account_not_allowed for an account the key does not list; underscore
    spellings of checked or injected headers never reach the vendor."""
    key = tenant.issue_key(allowed_endpoints=["/v1/customers"], stripe_accounts=["acct_1ALLOWED"])
    for name in ("Stripe_Account", "Stripe_Context", "stripe_account"):
        status, _, data = raw_request(keybrake, "GET", "/stripe/v1/customers", key["token"],
                                      headers={name: "acct_VICTIM"})
        assert status == 403 and json.loads(data)["code"] == "account_not_allowed", (name, status, data[:200])
    assert fake_stripe.received() == []
    status, _, data = raw_request(keybrake, "GET", "/stripe/v1/customers", key["token"],
                                  headers={"Stripe_Account": "acct_1ALLOWED", "Idempotency_Key": "x",
                                           "X_Api_Key": "vk_leak", "X_Note": "kept"})
    assert status == 200, data[:300]
    got = fake_stripe.received()[-1].headers
    assert not any(h in got for h in ("stripe_account", "idempotency_key", "x_api_key")), got
    assert got.get("x_note") == "kept"


def test_v2_json_bodies_are_forwarded_as_json(keybrake, tenant, fake_stripe):
    """Stripe's v2 API takes JSON only: a JSON body to /v2/… reaches Stripe unchanged,
    while the same body to /v1/… is converted to a form."""
    key = tenant.issue_key(allowed_endpoints=["POST /v2/core/event_destinations", "POST /v1/customers"])
    payload = {"name": "dest", "enabled_events": ["v1.billing.meter.error_report_triggered"],
               "type": "webhook_endpoint", "webhook_endpoint": {"url": "https://example.com/hook"}}
    raw = json.dumps(payload).encode()
    keybrake.proxy("POST", "/stripe/v2/core/event_destinations", key=key["token"], data=raw,
                   headers={"Content-Type": "application/json"})
    got = fake_stripe.received()[-1]
    assert got.path == "/v2/core/event_destinations" and got.body == raw
    assert got.headers.get("content-type", "").startswith("application/json")
    keybrake.proxy("POST", "/stripe/v1/customers", key=key["token"], json={"name": "x", "metadata": {"a": "b"}})
    assert ("metadata[a]", "b") in fake_stripe.received()[-1].form


def _serve_each_connection(listener: socket.socket, handle) -> None:
    """Accepts connections on `listener` until it is closed, each handled on a thread."""
    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def _reset(conn: socket.socket) -> None:
    """Closes `conn` with a reset (RST), not a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def _closing_upstream():
    """A vendor that answers the first request on each connection, and reads a second
    one on it whole, then resets the connection without answering (it may or may not
    have acted on it: the proxy cannot tell)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    served = []
    unanswered = []

    def read_request(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            rest += chunk
        return rest

    def handle(conn):
        with conn:
            body = read_request(conn)
            if body is None:
                return
            served.append(len(body))
            answer = json.dumps({"id": f"pi_stale{len(served)}", "object": "payment_intent",
                                 "amount": 700, "currency": "usd"}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)
            body = read_request(conn)
            if body is not None:  # the next request on this connection: reset, unanswered
                unanswered.append(len(body))
                _reset(conn)

    _serve_each_connection(listener, handle)
    return listener, served, unanswered


def test_a_payment_sent_whole_on_a_connection_that_then_fails_is_not_sent_again(keybrake_factory, stripe_secret,
                                                                                   tmp_path):
    """A large metered body (sent by Keybrake's own exchange) goes out whole on a pooled
    connection, and the vendor resets it without answering. Keybrake cannot know the
    vendor did not act on it, so it does not send it again: 502 upstream_unavailable,
    charged as a call that may have moved money. The next payment goes on a fresh
    connection and succeeds. (A connection goes back to the pool before its answer ends,
    so the second payment lands on the first one's connection. One worker thread: with two,
    Pingora 0.9's pool can drop a pooled connection when its idle watcher lets go of it on
    the other thread, and the payment then opens a new one.)"""
    listener, served, unanswered = _closing_upstream()
    try:
        config = write_config(tmp_path / "conf", pingora={"threads": 1})
        kb = keybrake_factory({"stripe": f"http://127.0.0.1:{listener.getsockname()[1]}"}, config=config)
        t = kb.create_tenant()
        t.put_credential("stripe", stripe_secret)
        key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
        assert pay(kb, key["token"], 700, **LARGE).status_code == 200
        sent = 1
        while not unanswered and sent < 6:
            r = pay(kb, key["token"], 700, **LARGE)
            sent += 1
            if unanswered:
                assert_denied(r, 502, "upstream_unavailable")
            else:
                assert r.status_code == 200, r.text
        assert len(unanswered) == 1 and sent == 2, (sent, served, unanswered)
        r = pay(kb, key["token"], 700, **LARGE)
        sent += 1
        assert r.status_code == 200, r.text
        # Every payment reached the vendor once: the unanswered one was not sent again.
        assert len(served) + len(unanswered) == sent, (sent, served, unanswered)
        t.wait_spent(key["id"], Decimal(7 * sent))
    finally:
        listener.close()


def _chaos_upstream(seed: int):
    """A vendor that, request by request (drawn at random from `seed`, in the order
    requests arrive), answers 200, answers 500, answers and then closes the connection,
    resets the connection after reading the header only (it cannot act on a request it
    did not get whole), or resets it after reading the whole request without answering
    (it may have acted). `whole` lists the `metadata[n]` of every request it got whole:
    each is a payment it may have made. `errors`: what the vendor itself failed on."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    whole: list[str] = []
    errors: list[str] = []
    draw = random.Random(seed)
    lock = threading.Lock()

    def handle(conn):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        conn.close()
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                with lock:
                    behaviour = draw.choices(["answer", "500", "answer_close", "reset_head", "reset_body"],
                                             [50, 10, 10, 15, 15])[0]
                if behaviour == "reset_head":
                    _reset(conn)
                    return
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        conn.close()
                        return
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                n = dict(urllib.parse.parse_qsl(body.decode()))["metadata[n]"]
                with lock:
                    whole.append(n)
                if behaviour == "reset_body":
                    _reset(conn)
                    return
                status = "500 Internal Server Error" if behaviour == "500" else "200 OK"
                answer = json.dumps({"id": f"pi_{n}", "object": "payment_intent", "amount": 100,
                                     "currency": "usd"}).encode()
                conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)
                if behaviour == "answer_close":
                    conn.close()
                    return
        except OSError:
            conn.close()
        except Exception as e:  # a request the fake cannot read: the test fails on it
            errors.append(repr(e))
            conn.close()

    _serve_each_connection(listener, handle)
    return listener, whole, errors


@pytest.mark.parametrize("cap", [1000, 50])
def test_a_vendor_that_resets_and_fails_at_random_never_gets_a_payment_twice_or_unmetered(
        keybrake_factory, stripe_secret, cap):
    """240 $1 payments (small bodies on Pingora's path, large ones on Keybrake's own
    exchange), from three clients at once, against a vendor that at random answers, fails
    with 500, closes or resets connections before or after reading a request whole. No
    payment reaches it whole twice (a request written whole is never sent again), every
    payment it may have made is counted (spend ≥ what it got whole), and no more than was
    asked for or the cap allows; each client gets the vendor's answer, 502
    upstream_unavailable, or (the $50 cap reached) 429 cap_exhausted."""
    listener, whole, errors = _chaos_upstream(seed=20261205)
    try:
        kb = keybrake_factory({"stripe": f"http://127.0.0.1:{listener.getsockname()[1]}"})
        t = kb.create_tenant()
        t.put_credential("stripe", stripe_secret)
        key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=cap)

        def pay_n(n: int) -> int:
            extra = LARGE if n % 2 else {}
            r = pay(kb, key["token"], 100, **{"metadata[n]": str(n)}, **extra)
            if r.status_code == 502:
                assert_denied(r, 502, "upstream_unavailable")
            if r.status_code == 429:
                assert_denied(r, 429, "cap_exhausted")
            if r.status_code in (200, 500):  # the vendor's own answer to this payment
                assert r.json()["id"] == f"pi_{n}", r.text
            return r.status_code

        with ThreadPoolExecutor(3) as pool:
            statuses = list(pool.map(pay_n, range(240)))
        assert not errors, errors
        assert set(statuses) <= {200, 500, 502, 429}, statuses
        assert 200 in statuses and 502 in statuses and (429 in statuses) == (cap < 240), statuses
        assert len(whole) == len(set(whole)), sorted(n for n in set(whole) if whole.count(n) > 1)
        # Nothing held any more: what is spent is settled.
        held_none = wait_until(lambda: (lambda k: k if k["held_usd"] == 0 else None)(t.get_key(key["id"])),
                               timeout=20, interval=0.25)
        assert held_none, t.get_key(key["id"])
        spent = Decimal(str(held_none["spent_today_usd"]))
        print(f"{statuses.count(200)} answered 200, {statuses.count(500)} 500, {statuses.count(502)} 502, "
              f"{statuses.count(429)} 429; the vendor got {len(whole)} whole; ${spent} spent (cap ${cap})")
        assert len(whole) <= spent <= min(240, cap), (len(whole), spent)
        # A payment answered 200 or 500 reached the vendor whole.
        assert statuses.count(200) + statuses.count(500) <= len(whole)
    finally:
        listener.close()


def test_two_idempotency_keys_or_two_content_types_on_a_charge_are_refused(keybrake, tenant, fake_stripe):
    """A retry is free only when it is surely the same request. Two Idempotency-Key
    headers (the vendor may read or join either) or two Content-Types (the vendor may
    parse the body as the other) on a metered call: 400 invalid_amount, nothing sent."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=50)
    r = keybrake.proxy("POST", PI, key=key["token"], data={"amount": 1000, "currency": "usd"},
                       headers={"Idempotency-Key": "k1"})
    assert r.status_code == 200, r.text
    before = len(fake_stripe.received_matching("POST", "/v1/payment_intents"))
    for extra in ([("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")],
                  [("Content-Type", "multipart/form-data; boundary=BB")]):
        conn = http.client.HTTPConnection("127.0.0.1", keybrake.proxy_port, timeout=10)
        body = b"amount=1000&currency=usd"
        conn.putrequest("POST", PI)
        conn.putheader("Authorization", f"Bearer {key['token']}")
        conn.putheader("Content-Type", "application/x-www-form-urlencoded")
        for name, value in extra:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        conn.close()
        assert resp.status == 400, answer
        assert answer["error"]["code"] == "invalid_amount", answer
    assert len(fake_stripe.received_matching("POST", "/v1/payment_intents")) == before
    tenant.wait_spent(key["id"], Decimal(10))


def test_a_header_named_by_connection_is_not_read_either(keybrake, tenant, fake_stripe):
    """Headers listed in `Connection` are hop-by-hop: the vendor never gets them, so the
    proxy does not read them either. A charged payment sent again with its
    Idempotency-Key named in `Connection` reaches Stripe without one, a new charge: it is
    charged too, and the third is refused at the $10 cap."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    headers = {"Idempotency-Key": f"idem-{secrets.token_hex(4)}"}

    def five_dollars(headers):
        return keybrake.proxy("POST", PI, key=key["token"], data={"amount": 500, "currency": "usd"},
                              headers=headers)

    assert five_dollars(headers).status_code == 200
    hidden = {**headers, "Connection": "keep-alive, Idempotency-Key"}
    r = five_dollars(hidden)
    assert r.status_code == 200, r.text
    tenant.wait_spent(key["id"], Decimal(10))
    assert_denied(five_dollars(hidden), 429, "cap_exhausted")
    sent = fake_stripe.received_matching("POST", "/v1/payment_intents")
    assert len(sent) == 2 and "idempotency-key" in sent[0].headers
    assert "idempotency-key" not in sent[1].headers


def test_an_intents_amount_currency_and_overcapture_are_set_only_at_its_metered_create(
        keybrake, tenant, fake_stripe):
    """A confirm or capture reserves what a look-up of the intent reads: an update that
    raised the amount behind it would charge past the cap. Updating `amount` or
    `currency`, or asking for overcapture, is 403 endpoint_unmetered and never reaches
    Stripe; other updates work."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents", "POST /v1/payment_intents/*"],
                           daily_usd_cap=10)
    r = pay(keybrake, key["token"], 100)
    assert r.status_code == 200, r.text
    intent = r.json()["id"]
    url = f"{PI}/{intent}"
    for data in [{"amount": "1000000"}, {"currency": "jpy"}, {"metadata[x]": "1", "amount": "5000"},
                 {"payment_method_options[card][request_overcapture]": "if_available"}]:
        assert_denied(keybrake.proxy("POST", url, key=key["token"], data=data), 403, "endpoint_unmetered")
    assert_denied(keybrake.proxy("POST", url, key=key["token"], json={"amount": 1000000}),
                  403, "endpoint_unmetered")
    assert_denied(keybrake.proxy("POST", f"{url}?amount=1000000", key=key["token"], data={"description": "x"}),
                  403, "endpoint_unmetered")
    assert_denied(pay(keybrake, key["token"], 100, **{"payment_method_options[card][request_overcapture]": "if_available"}),
                  403, "endpoint_unmetered")
    assert fake_stripe.received_matching("POST", f"/v1/payment_intents/{intent}") == []
    r = keybrake.proxy("POST", url, key=key["token"], data={"description": "order 7"})
    assert r.status_code == 200 and r.json()["amount"] == 100, r.text


def test_a_price_in_other_currencies_cannot_be_made_through_a_capped_key(keybrake, tenant, fake_stripe):
    """A subscription's items are looked up at each price's own currency: a price that
    also bills in other currencies (`currency_options`, on the price or a product's
    default price) could charge a customer more than the look-up reads. 403
    endpoint_unmetered, never sent; a plain price works."""
    key = tenant.issue_key(allowed_endpoints=["POST /v1/prices", "POST /v1/prices/*", "POST /v1/products"],
                           daily_usd_cap=5)
    for path, data in [
        ("/stripe/v1/prices", {"currency": "usd", "unit_amount": "100", "product_data[name]": "p",
                               "currency_options[jpy][unit_amount]": "99999999"}),
        ("/stripe/v1/prices/price_1", {"currency_options[eur][unit_amount]": "99999"}),
        ("/stripe/v1/products", {"name": "p", "default_price_data[currency]": "usd",
                                 "default_price_data[unit_amount]": "100",
                                 "default_price_data[currency_options][jpy][unit_amount]": "99999999"}),
        ("/stripe/v1/products", {"name": "p", "[default_price_data][currency_options][jpy][unit_amount]]": "9"}),
    ]:
        assert_denied(keybrake.proxy("POST", path, key=key["token"], data=data), 403, "endpoint_unmetered")
    assert fake_stripe.received() == []
    r = keybrake.proxy("POST", "/stripe/v1/products", key=key["token"], data={"name": "plain"})
    assert r.status_code == 200, r.text


class _GarbledConfirm(http.server.BaseHTTPRequestHandler):
    """A Stripe that looks up a $10 intent, then answers its confirm 200 with a body that
    is not JSON; creates payments normally."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type: str = "application/json"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(json.dumps({"id": self.path.rsplit("/", 1)[-1], "object": "payment_intent",
                               "amount": 1000, "currency": "usd",
                               "status": "requires_confirmation"}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/confirm"):
            self._send(b"<html>upstream gateway glitch</html>", "text/html")
        else:
            self._send(json.dumps({"id": "pi_" + secrets.token_hex(6), "object": "payment_intent",
                                   "amount": 100, "currency": "usd"}).encode())


def test_a_charge_over_the_cap_learned_from_the_answer_survives_a_kill_9_right_after_it(
        keybrake_factory, stripe_secret, tmp_path):
    """A confirm looked up at $10 whose answer says $500 was charged, on a $100 key, with
    the default audit durability: serve reports the $400 beyond the cap to its ledger
    before the answer's end leaves, so killed -9 the moment the client has the answer, it
    still counts all $500 after the restart, and the key stays stopped."""
    vendor = start_vendor(ConfirmChargesMore)
    config = write_config(tmp_path / "conf", leases={"lifetime_seconds": 3})
    kb = keybrake_factory({"stripe": f"http://127.0.0.1:{vendor.server_address[1]}"}, config=config)
    try:
        t = kb.create_tenant()
        t.put_credential("stripe", stripe_secret)
        key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents/*/confirm"], daily_usd_cap=100)
        auth = {"Authorization": f"Bearer {key['token']}"}
        r = kb.proxy("POST", "/stripe/v1/payment_intents/pi_abc/confirm", headers=auth)
        assert r.status_code == 200, r.text
        kb.kill9()
        kb.start()
        settled = wait_until(lambda: (lambda k: k if k["held_usd"] == 0 else None)(t.get_key(key["id"])),
                             timeout=15, interval=0.3)
        assert settled and settled["spent_today_usd"] == 500, settled
        assert_denied(kb.proxy("POST", "/stripe/v1/payment_intents/pi_abc/confirm", headers=auth),
                      429, "cap_exhausted")
    finally:
        vendor.shutdown()


def test_a_charge_learned_from_the_answer_survives_a_kill_9_right_after_it(
        keybrake_factory, stripe_secret, tmp_path):
    """A confirm whose 2xx answer cannot be read is charged the key's whole cap (what the
    vendor took is unknown): the key stops for the day. serve killed -9 right after that
    answer, before its next spend report: on restart the dead process's lease is settled
    from the audit trail, all of it, not only the $10 reserved, and the key stays stopped.
    (audit strict: the answer is released once its event is committed.)"""
    vendor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GarbledConfirm)
    vendor.daemon_threads = True
    threading.Thread(target=vendor.serve_forever, daemon=True).start()
    config = write_config(tmp_path / "conf", leases={"lifetime_seconds": 3},
                          audit={"durability": "strict"})
    kb = keybrake_factory({"stripe": f"http://127.0.0.1:{vendor.server_address[1]}"}, config=config)
    try:
        t = kb.create_tenant()
        t.put_credential("stripe", stripe_secret)
        key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents",
                                             "POST /v1/payment_intents/*/confirm"], daily_usd_cap=100)
        auth = {"Authorization": f"Bearer {key['token']}"}
        r = kb.proxy("POST", "/stripe/v1/payment_intents/pi_abc/confirm", headers=auth)
        assert r.status_code == 200
        kb.kill9()
        kb.start()
        settled = wait_until(lambda: (lambda k: k if k["held_usd"] == 0 else None)(t.get_key(key["id"])),
                             timeout=15, interval=0.3)
        assert settled and settled["spent_today_usd"] == 100, settled
        r = kb.proxy("POST", "/stripe/v1/payment_intents", headers=auth,
                     data={"amount": "100", "currency": "usd"})
        assert_denied(r, 429, "cap_exhausted")
    finally:
        vendor.shutdown()
