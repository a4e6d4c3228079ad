"""Control plane (SPEC §3): tenants, API tokens, nodes, signing keys, vendor
credentials, vault keys, audit; authentication, input validation, tenant isolation,
pagination, persistence across restarts, secrets at rest. Every test runs on both
storage backends (conftest.py), except those about the embedded store's files."""

import json
import os
import secrets
import socket
import signal
import stat
import time
from decimal import Decimal

import pytest
import requests

from harness import (
    as_json,
    assert_control_error,
    assert_denied,
    jwks,
    parse_ts,
    token_parts,
    verify_with_jwks,
    steppable_clock,
    wait_until,
    write_config,
)

VALID_KEY = {
    "label": "deno-charge-1",
    "vendor": "stripe",
    "allowed_endpoints": ["/v1/payment_intents", "/v1/payment_intents/*"],
    "daily_usd_cap": 500,
    "expires_in": "5m",
}

KEY_FIELDS = {
    "id",
    "vendor",
    "label",
    "allowed_endpoints",
    "daily_usd_cap",
    "expires_at",
    "created_at",
    "revoked_at",
    "status",
    "spent_today_usd",
    "held_usd",
    "metadata",
}


def key_body(**overrides):
    body = dict(VALID_KEY)
    for k, v in overrides.items():
        if v is _DROP:
            body.pop(k, None)
        else:
            body[k] = v
    return body


_DROP = object()

pytestmark = pytest.mark.both_backends
DATA_DIR_ONLY = pytest.mark.sqlite_only("about `serve`'s data dir, which PostgreSQL replaces")


# --------------------------------------------------------------------------- public


def test_health_and_readiness_answer_without_credentials(keybrake):
    """/healthz and /readyz are public and answer 200 once the server is up."""
    assert requests.get(f"{keybrake.control_url}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{keybrake.control_url}/readyz", timeout=5).status_code == 200


def test_unknown_route_is_a_json_404(keybrake):
    """An unknown control path answers 404 with the standard error shape, not a 500."""
    r = keybrake.admin("GET", "/v1/nope")
    assert r.status_code == 404
    assert isinstance(as_json(r)["error"]["code"], str)


# --------------------------------------------------------------------------- tenants


def test_admin_creates_tenant_and_sees_its_api_token_only_once(keybrake):
    """POST /v1/tenants returns 201 with tn_ id, the name and a kb_ API token; the list
    (GET /v1/tenants) shows id, name, created_at and never the token."""
    r = keybrake.admin("POST", "/v1/tenants", json={"name": "acme"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["id"].startswith("tn_")
    assert created["name"] == "acme"
    assert created["api_token"].startswith("kb_")

    r = keybrake.admin("GET", "/v1/tenants")
    assert r.status_code == 200, r.text
    listing = r.json()
    assert "next_cursor" in listing and listing["next_cursor"] is None
    mine = [t for t in listing["data"] if t["id"] == created["id"]]
    assert len(mine) == 1
    assert mine[0]["name"] == "acme"
    assert abs(parse_ts(mine[0]["created_at"]) - time.time()) < 120
    assert created["api_token"] not in r.text
    assert "api_token" not in mine[0]


def test_new_tenant_token_is_usable_right_away(keybrake):
    """The API token returned at tenant creation authenticates tenant endpoints."""
    t = keybrake.create_tenant("fresh")
    r = t.call("GET", "/v1/keys")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []


def test_the_bearer_scheme_is_case_insensitive_and_two_authorization_headers_are_refused(keybrake):
    """`Bearer` in any case (RFC 9110); two Authorization headers (two tenants' tokens)
    are 401 invalid_token, not whichever came first."""
    import http.client

    t = keybrake.create_tenant("auth-a")
    other = keybrake.create_tenant("auth-b")
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = requests.get(f"{keybrake.control_url}/v1/keys", headers={"Authorization": f"{scheme} {t.token}"},
                         timeout=10)
        assert r.status_code == 200, (scheme, r.text)
    conn = http.client.HTTPConnection("127.0.0.1", keybrake.control_port, timeout=10)
    try:
        conn.putrequest("GET", "/v1/keys")
        conn.putheader("Authorization", f"Bearer {t.token}")
        conn.putheader("Authorization", f"Bearer {other.token}")
        conn.endheaders()
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 401 and body["error"]["code"] == "invalid_token", body


@pytest.mark.parametrize(
    "body,status,code",
    [
        ("{not json", 400, "invalid_json"),
        ("{}", 400, "invalid_request"),
        ('{"name": 42}', 400, "invalid_request"),
        ('["acme"]', 400, "invalid_request"),
    ],
)
def test_create_tenant_rejects_bad_bodies(keybrake, body, status, code):
    """Malformed JSON is invalid_json; a missing or mistyped name is invalid_request."""
    r = keybrake.admin("POST", "/v1/tenants", data=body, headers={"Content-Type": "application/json"})
    assert_control_error(r, status, code)


ADMIN_ENDPOINTS = [
    ("GET", "/v1/tenants", None),
    ("POST", "/v1/tenants", {"name": "x"}),
    ("POST", "/v1/nodes", {"name": "edge-1"}),
    ("POST", "/v1/admin/signing-keys/rotate", None),
]


@pytest.mark.parametrize("method,path,body", ADMIN_ENDPOINTS)
def test_admin_endpoints_refuse_missing_wrong_and_tenant_tokens(keybrake, method, path, body):
    """Admin endpoints: no Authorization → 401 missing_token; a wrong token or a tenant's
    API token → 401 invalid_token."""
    t = keybrake.create_tenant()
    assert_control_error(keybrake.control(method, path, json=body), 401, "missing_token")
    assert_control_error(keybrake.control(method, path, token="not-the-admin", json=body), 401, "invalid_token")
    assert_control_error(keybrake.control(method, path, token=t.token, json=body), 401, "invalid_token")


def test_a_token_of_the_wrong_kind_is_named_and_a_proxied_path_points_to_the_proxy(keybrake, stripe_secret):
    """A tenant's API token on an admin endpoint, the admin token or a vault key on a
    tenant endpoint: 401 invalid_token whose message says which kind it is (by prefix,
    never more of it). A proxied path sent to the control API names the proxy listener;
    a control API token sent to the proxy is told apart from the vendor's secret."""
    t = keybrake.create_tenant()
    t.put_credential("stripe", stripe_secret)
    key = t.issue_key(allowed_endpoints=["GET /v1/customers"])
    body = assert_control_error(keybrake.control("POST", "/v1/tenants", token=t.token, json={"name": "x"}),
                                401, "invalid_token")
    assert "admin token" in body["error"]["message"] and "tenant API token (kb_" in body["error"]["message"], body
    assert t.token[3:] not in json.dumps(body)
    body = assert_control_error(keybrake.control("GET", "/v1/keys", token=key["token"]), 401, "invalid_token")
    assert "vault key" in body["error"]["message"] and "proxy" in body["error"]["message"], body
    body = assert_control_error(keybrake.control("GET", "/v1/keys", token="kba_" + "x" * 30), 401, "invalid_token")
    assert "the admin token (kba_" in body["error"]["message"], body
    body = assert_control_error(keybrake.control("GET", "/v1/tenants", token="kba_not-the-admin"), 401, "invalid_token")
    assert body["error"]["message"] == "this endpoint needs a valid admin token", body
    body = assert_control_error(keybrake.control("GET", "/stripe/v1/customers", token=key["token"]), 404, "not_found")
    assert "proxy listener" in body["error"]["message"], body
    body = assert_control_error(keybrake.control("GET", "/v2/nothing"), 404, "not_found")
    assert body["error"]["message"] == "route not found", body
    r = keybrake.proxy("GET", "/stripe/v1/customers", headers={"Authorization": f"Bearer {t.token}"})
    denied = assert_denied(r, 401, "invalid_key")
    assert "control API token" in denied["message"] and denied["message"] == denied["error"]["message"], denied


def test_admin_token_endpoints_refuse_tenant_tokens(keybrake):
    """Creating or deleting a tenant's API tokens is admin-only, even for that tenant."""
    t = keybrake.create_tenant()
    assert_control_error(t.call("POST", f"/v1/tenants/{t.id}/api_tokens"), 401, "invalid_token")
    assert_control_error(t.call("DELETE", f"/v1/tenants/{t.id}/api_tokens/tok_x"), 401, "invalid_token")


TENANT_ENDPOINTS = [
    ("GET", "/v1/keys", None),
    ("POST", "/v1/keys", VALID_KEY),
    ("GET", "/v1/keys/key_doesnotexist", None),
    ("DELETE", "/v1/keys/key_doesnotexist", None),
    ("GET", "/v1/audit", None),
    ("PUT", "/v1/vendors/stripe/credential", {"secret": "sk_test_x"}),
    ("GET", "/v1/vendors/stripe/credential", None),
    ("DELETE", "/v1/vendors/stripe/credential", None),
]


@pytest.mark.parametrize("method,path,body", TENANT_ENDPOINTS)
def test_tenant_endpoints_refuse_missing_wrong_and_admin_tokens(keybrake, method, path, body):
    """Tenant endpoints: no Authorization → 401 missing_token; a wrong token or the admin
    token → 401 invalid_token."""
    assert_control_error(keybrake.control(method, path, json=body), 401, "missing_token")
    assert_control_error(keybrake.control(method, path, token="kb_wrong", json=body), 401, "invalid_token")
    assert_control_error(keybrake.admin(method, path, json=body), 401, "invalid_token")


def test_second_api_token_works_and_deleting_it_makes_it_401(keybrake):
    """POST /v1/tenants/{id}/api_tokens → 201 {id, api_token}; the new token works
    alongside the first; DELETE …/api_tokens/{token_id} makes it 401 invalid_token at
    once while the first keeps working."""
    t = keybrake.create_tenant()
    r = keybrake.admin("POST", f"/v1/tenants/{t.id}/api_tokens")
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["api_token"].startswith("kb_") and second["api_token"] != t.token
    assert isinstance(second["id"], str) and second["id"]

    assert keybrake.control("GET", "/v1/keys", token=second["api_token"]).status_code == 200
    assert keybrake.control("GET", "/v1/keys", token=t.token).status_code == 200

    r = keybrake.admin("DELETE", f"/v1/tenants/{t.id}/api_tokens/{second['id']}")
    assert r.status_code == 200, r.text
    assert_control_error(keybrake.control("GET", "/v1/keys", token=second["api_token"]), 401, "invalid_token")
    assert keybrake.control("GET", "/v1/keys", token=t.token).status_code == 200


def test_initial_api_token_can_be_retired_after_rotation(keybrake):
    """Rotating a tenant's API token means issuing a second one and deleting the first:
    the creation response names the first token's id (`api_token_id`), and once deleted
    the first token is 401 while the second works."""
    r = keybrake.admin("POST", "/v1/tenants", json={"name": "rotating"})
    assert r.status_code == 201
    created = r.json()
    assert "api_token_id" in created, (
        f"POST /v1/tenants gives no id for its api_token, so it can never be deleted: {sorted(created)}"
    )
    r = keybrake.admin("POST", f"/v1/tenants/{created['id']}/api_tokens")
    second = r.json()["api_token"]
    r = keybrake.admin("DELETE", f"/v1/tenants/{created['id']}/api_tokens/{created['api_token_id']}")
    assert r.status_code == 200, r.text
    assert_control_error(keybrake.control("GET", "/v1/keys", token=created["api_token"]), 401, "invalid_token")
    assert keybrake.control("GET", "/v1/keys", token=second).status_code == 200


def test_api_token_management_of_unknown_objects_is_404(keybrake):
    """Unknown tenant or token ids answer 404 not_found; another tenant's token id too."""
    a = keybrake.create_tenant()
    b = keybrake.create_tenant()
    assert_control_error(keybrake.admin("POST", "/v1/tenants/tn_doesnotexist/api_tokens"), 404, "not_found")
    assert_control_error(keybrake.admin("DELETE", f"/v1/tenants/{a.id}/api_tokens/nope"), 404, "not_found")
    b_token = keybrake.admin("POST", f"/v1/tenants/{b.id}/api_tokens").json()
    assert_control_error(keybrake.admin("DELETE", f"/v1/tenants/{a.id}/api_tokens/{b_token['id']}"), 404, "not_found")
    assert keybrake.control("GET", "/v1/keys", token=b_token["api_token"]).status_code == 200


def test_endpoints_without_fields_take_no_body_or_an_empty_object(keybrake):
    """POST api_tokens and signing-key rotation take no fields: none or `{}` is fine, a
    field is refused as an unknown field is elsewhere (400 invalid_request), not ignored."""
    t = keybrake.create_tenant()
    path = f"/v1/tenants/{t.id}/api_tokens"
    assert keybrake.admin("POST", path).status_code == 201
    assert keybrake.admin("POST", path, json={}).status_code == 201
    assert_control_error(keybrake.admin("POST", path, json={"x": 1}), 400, "invalid_request")
    assert_control_error(keybrake.admin("POST", "/v1/admin/signing-keys/rotate", json={"kid": "mine"}),
                         400, "invalid_request")
    assert_control_error(keybrake.admin("POST", path, data=b"{"), 400, "invalid_json")


def test_admin_registers_an_edge_node(keybrake):
    """POST /v1/nodes {name} → 201 {id: nd_…, node_token: kbn_…}; a bad body is 400."""
    r = keybrake.admin("POST", "/v1/nodes", json={"name": "edge-fra-1"})
    assert r.status_code == 201, r.text
    node = r.json()
    assert node["id"].startswith("nd_")
    assert node["node_token"].startswith("kbn_")
    assert_control_error(keybrake.admin("POST", "/v1/nodes", json={}), 400, "invalid_request")
    assert_control_error(
        keybrake.admin("POST", "/v1/nodes", data="{", headers={"Content-Type": "application/json"}),
        400,
        "invalid_json",
    )


# --------------------------------------------------------------------------- credentials


def test_vendor_credential_is_stored_and_only_its_metadata_is_ever_returned(keybrake, stripe_secret):
    """PUT returns {vendor, last4, updated_at}; GET returns the same metadata; the
    secret itself appears in no response."""
    t = keybrake.create_tenant()
    r = t.call("PUT", "/v1/vendors/stripe/credential", json={"secret": stripe_secret})
    assert r.status_code == 200, r.text
    put = r.json()
    assert put["vendor"] == "stripe"
    assert put["last4"] == stripe_secret[-4:]
    assert abs(parse_ts(put["updated_at"]) - time.time()) < 120
    assert stripe_secret not in r.text

    r = t.call("GET", "/v1/vendors/stripe/credential")
    assert r.status_code == 200, r.text
    assert r.json() == put
    assert stripe_secret not in r.text

    # Replacing it updates last4.
    other = "sk_test_" + secrets.token_hex(20)
    r = t.call("PUT", "/v1/vendors/stripe/credential", json={"secret": other})
    assert r.status_code == 200 and r.json()["last4"] == other[-4:]


def test_deleting_the_credential_stops_key_issuance(keybrake, stripe_secret):
    """DELETE → 200 {vendor, deleted: true}; GET is then 404 and POST /v1/keys for that
    vendor is 422 vendor_not_configured."""
    t = keybrake.create_tenant()
    t.put_credential("stripe", stripe_secret)
    t.issue_key(**VALID_KEY)
    r = t.call("DELETE", "/v1/vendors/stripe/credential")
    assert r.status_code == 200, r.text
    assert r.json() == {"vendor": "stripe", "deleted": True}
    assert_control_error(t.call("GET", "/v1/vendors/stripe/credential"), 404, "not_found")
    assert_control_error(t.call("POST", "/v1/keys", json=VALID_KEY), 422, "vendor_not_configured")


def test_credentials_belong_to_one_tenant(keybrake, stripe_secret):
    """Tenant A's Stripe credential is invisible to tenant B, who cannot issue Stripe
    keys until it registers its own."""
    a = keybrake.create_tenant()
    b = keybrake.create_tenant()
    a.put_credential("stripe", stripe_secret)
    assert_control_error(b.call("GET", "/v1/vendors/stripe/credential"), 404, "not_found")
    assert_control_error(b.call("POST", "/v1/keys", json=VALID_KEY), 422, "vendor_not_configured")


@pytest.mark.parametrize(
    "body,code",
    [
        ("{oops", "invalid_json"),
        ("{}", "invalid_request"),
        ('{"secret": 12345}', "invalid_request"),
    ],
)
def test_credential_rejects_bad_bodies(keybrake, body, code):
    """A malformed credential body is 400 with a precise code, never a 500."""
    t = keybrake.create_tenant()
    r = t.call("PUT", "/v1/vendors/stripe/credential", data=body, headers={"Content-Type": "application/json"})
    assert_control_error(r, 400, code)


def test_credential_for_an_unknown_vendor_is_refused(keybrake):
    """PUT for a vendor absent from the catalog is a client error (4xx), never stored."""
    t = keybrake.create_tenant()
    r = t.call("PUT", "/v1/vendors/nosuchvendor/credential", json={"secret": "sk_x_12345"})
    assert r.status_code in (404, 422), r.text
    assert isinstance(as_json(r)["error"]["code"], str)
    # A vendor secret is printable ASCII: a pasted no-break space or accent is refused.
    for bad in ("sk_test_\u00e9abcdefgh", "sk_test\u00a0abcdefgh", "sk_test_\u202eabcdefgh"):
        assert_control_error(t.call("PUT", "/v1/vendors/stripe/credential", json={"secret": bad}),
                             400, "invalid_request")
    # A secret whose form shows it cannot be the vendor's: a Stripe publishable key, a
    # Keybrake token (the tenant's own, pasted by mistake).
    body = assert_control_error(t.call("PUT", "/v1/vendors/stripe/credential", json={"secret": "pk_test_abcdefgh"}),
                                400, "invalid_request")
    assert "publishable" in body["error"]["message"], body
    body = assert_control_error(t.call("PUT", "/v1/vendors/openai/credential", json={"secret": t.token}),
                                400, "invalid_request")
    assert "Keybrake token" in body["error"]["message"] and t.token not in json.dumps(body), body
    assert t.call("PUT", "/v1/vendors/openai/credential", json={"secret": "pk_not_stripe_x"}).status_code == 200
    # Reading or deleting one says the same, not that the credential is missing.
    for method in ("GET", "DELETE"):
        assert_control_error(t.call(method, "/v1/vendors/nosuchvendor/credential"), 404, "unknown_vendor")
        assert_control_error(t.call(method, "/v1/vendors/anthropic/credential"), 404, "not_found")


# --------------------------------------------------------------------------- keys


def test_issue_key_returns_a_vault_key_and_its_scope(tenant):
    """POST /v1/keys → 201 with key_ id, vk_ token and the scope echoed back; expiry is
    now + expires_in."""
    r = tenant.call("POST", "/v1/keys", json=VALID_KEY)
    assert r.status_code == 201, r.text
    k = as_json(r)
    assert k["id"].startswith("key_")
    assert k["token"].startswith("vk_ey")
    assert k["vendor"] == "stripe"
    assert k["label"] == "deno-charge-1"
    assert k["allowed_endpoints"] == VALID_KEY["allowed_endpoints"]
    assert k["daily_usd_cap"] == 500
    assert abs(parse_ts(k["expires_at"]) - (time.time() + 300)) < 30


@pytest.mark.parametrize(
    "expires_in,seconds",
    [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("24h", 86400), (90, 90), (_DROP, 900)],
)
def test_expires_in_accepts_durations_and_integer_seconds(tenant, expires_in, seconds):
    """expires_in takes "30s", "5m", "2h", "1d" or integer seconds; default 15 minutes;
    24h (the default maximum) is allowed."""
    r = tenant.call("POST", "/v1/keys", json=key_body(expires_in=expires_in))
    assert r.status_code == 201, r.text
    assert abs(parse_ts(as_json(r)["expires_at"]) - (time.time() + seconds)) < 30


@pytest.mark.parametrize("cap, code", [
    ("1.5e-2147483648", "invalid_daily_usd_cap"),
    ("0.000000e-2147483648", "invalid_daily_usd_cap"),
    ("1e2147483647", "invalid_json"),  # beyond any JSON number the parser takes
])
def test_a_cap_with_an_extreme_exponent_is_refused_as_invalid(tenant, cap, code):
    """A JSON number whose exponent is at a 32-bit integer's ends is refused as a 400, like
    any other amount that is not a cap (and the server keeps answering)."""
    body = json.dumps(key_body(daily_usd_cap=0)).replace('"daily_usd_cap": 0', f'"daily_usd_cap": {cap}')
    r = tenant.call("POST", "/v1/keys", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert as_json(r)["error"]["code"] == code, r.text
    assert tenant.call("GET", "/v1/keys").status_code == 200


@pytest.mark.parametrize("cap", ["0.000001", "1", "12.5", "999.999999", "1000000000"])
def test_daily_cap_is_exact_to_the_micro_dollar(tenant, cap):
    """Caps from $0.000001 to $1,000,000,000 are accepted and read back exactly, and the
    token's `cap` claim is the same amount in integer micro-USD."""
    body = json.dumps(key_body(daily_usd_cap=0)).replace('"daily_usd_cap": 0', f'"daily_usd_cap": {cap}')
    r = tenant.call("POST", "/v1/keys", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    k = as_json(r)
    assert k["daily_usd_cap"] == Decimal(cap)
    assert tenant.get_key(k["id"])["daily_usd_cap"] == Decimal(cap)
    _, claims, _ = token_parts(k["token"])
    assert claims["cap"] == int(Decimal(cap) * 1_000_000)


def test_get_key_shows_status_spend_and_timestamps(tenant):
    """GET /v1/keys/{id} returns the key with status active, zero spend, metadata, and
    revoked_at null; stripe_accounts is absent unless set; the token is not returned."""
    issued = tenant.issue_key(**key_body(metadata={"invocation": "abc-123", "team": "billing"}))
    k = tenant.get_key(issued["id"])
    assert KEY_FIELDS <= set(k), sorted(k)
    assert "token" not in k
    assert k["id"] == issued["id"]
    assert k["status"] == "active"
    assert k["spent_today_usd"] == 0 and k["held_usd"] == 0
    assert k["revoked_at"] is None
    assert k["metadata"] == {"invocation": "abc-123", "team": "billing"}
    assert k["expires_at"] == issued["expires_at"]
    assert abs(parse_ts(k["created_at"]) - time.time()) < 120
    assert "stripe_accounts" not in k


def test_stripe_accounts_are_kept_on_the_key_and_in_the_token(tenant):
    """stripe_accounts is echoed on the key and carried as the `acc` claim; without it
    the token has no `acc` claim."""
    k = tenant.issue_key(**key_body(stripe_accounts=["acct_1ABC", "acct_2DEF"]))
    assert tenant.get_key(k["id"])["stripe_accounts"] == ["acct_1ABC", "acct_2DEF"]
    _, claims, _ = token_parts(k["token"])
    assert claims["acc"] == ["acct_1ABC", "acct_2DEF"]
    _, plain, _ = token_parts(tenant.issue_key(**VALID_KEY)["token"])
    assert "acc" not in plain


BAD_KEY_REQUESTS = [
    # daily_usd_cap
    ({"daily_usd_cap": 0}, "invalid_daily_usd_cap"),
    ({"daily_usd_cap": -5}, "invalid_daily_usd_cap"),
    ({"daily_usd_cap": "abc"}, "invalid_daily_usd_cap"),
    ({"daily_usd_cap": 1000000001}, "invalid_daily_usd_cap"),
    ({"daily_usd_cap": 1e300}, "invalid_daily_usd_cap"),
    ({"daily_usd_cap": 1.0000001}, "invalid_daily_usd_cap"),
    # expires_in
    ({"expires_in": "5x"}, "invalid_expires_in"),
    ({"expires_in": "-1m"}, "invalid_expires_in"),
    ({"expires_in": "0s"}, "invalid_expires_in"),
    ({"expires_in": "25h"}, "invalid_expires_in"),
    ({"expires_in": "2d"}, "invalid_expires_in"),
    ({"expires_in": ""}, "invalid_expires_in"),
    ({"expires_in": 0}, "invalid_expires_in"),
    ({"expires_in": -30}, "invalid_expires_in"),
    ({"expires_in": 86401}, "invalid_expires_in"),
    # allowed_endpoints
    ({"allowed_endpoints": [""]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": []}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["v1/payment_intents"]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["/v1/**/refunds"]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["FETCH /v1/payment_intents"]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["/v1/ok", "nope"]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["/v1/pi_*"]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["POST /v1/payment_intents/*x/confirm"]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["/v1/café"]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["/v1/" + "a" * 300]}, "invalid_endpoint_pattern"),
    ({"allowed_endpoints": ["GET /v1/customers#x"]}, "invalid_endpoint_pattern"),
    # 40 patterns of 250 bytes: each allowed, but over 8 KiB together (the key would be
    # too big for a request header)
    ({"allowed_endpoints": [f"/v1/{i:02}" + "a" * 245 for i in range(40)]}, "invalid_endpoint_pattern"),
    ({"stripe_accounts": [f"acct_{i}" for i in range(21)]}, "invalid_request"),
    ({"stripe_accounts": ["acct_1\r\nX-Evil: 1"]}, "invalid_request"),
    ({"stripe_accounts": ["acct_"]}, "invalid_request"),
    ({"stripe_accounts": ["acct_" + "a" * 60]}, "invalid_request"),
    # missing fields / wrong types
    ({"vendor": _DROP}, "invalid_request"),
    ({"vendor": 7}, "invalid_request"),
    ({"allowed_endpoints": _DROP}, "invalid_request"),
    ({"allowed_endpoints": "/v1/payment_intents"}, "invalid_request"),
    ({"allowed_endpoints": [1, 2]}, "invalid_request"),
    ({"label": 12}, "invalid_request"),
    ({"metadata": "not-an-object"}, "invalid_request"),
    ({"stripe_accounts": "acct_1"}, "invalid_request"),
]


@pytest.mark.parametrize("overrides,code", BAD_KEY_REQUESTS, ids=lambda v: repr(v) if isinstance(v, dict) else v)
def test_issue_key_rejects_bad_input_with_a_precise_400(tenant, overrides, code):
    """Each malformed POST /v1/keys field yields 400 with its own code, never a 500."""
    r = tenant.call("POST", "/v1/keys", json=key_body(**overrides))
    assert_control_error(r, 400, code)


@pytest.mark.parametrize("raw", ["{", "not json at all", '{"label": "x",}', ""])
def test_issue_key_rejects_malformed_json(tenant, raw):
    """A body that is not JSON is 400 invalid_json."""
    r = tenant.call("POST", "/v1/keys", data=raw, headers={"Content-Type": "application/json"})
    assert_control_error(r, 400, "invalid_json")


def test_issue_key_rejects_a_json_array(tenant):
    """A JSON body that is not an object is 400 invalid_request."""
    r = tenant.call("POST", "/v1/keys", json=[VALID_KEY])
    assert_control_error(r, 400, "invalid_request")


def test_unknown_vendor_is_not_configured(tenant):
    """A vendor absent from the catalog, or present but without a credential for this
    tenant, is 422 vendor_not_configured."""
    assert_control_error(tenant.call("POST", "/v1/keys", json=key_body(vendor="nosuchvendor")), 422, "vendor_not_configured")
    assert_control_error(tenant.call("POST", "/v1/keys", json=key_body(vendor="openai")), 422, "vendor_not_configured")


def test_tenant_cannot_see_or_revoke_another_tenants_key(keybrake, stripe_secret):
    """Tenant B gets 404 not_found on A's key (GET and DELETE), A's key stays active,
    and each tenant's list shows only its own keys."""
    a = keybrake.create_tenant("a")
    b = keybrake.create_tenant("b")
    a.put_credential("stripe", stripe_secret)
    b.put_credential("stripe", "sk_test_" + secrets.token_hex(20))
    ka = a.issue_key(**key_body(label="a-key"))
    kb_ = b.issue_key(**key_body(label="b-key"))

    assert_control_error(b.call("GET", f"/v1/keys/{ka['id']}"), 404, "not_found")
    assert_control_error(b.call("DELETE", f"/v1/keys/{ka['id']}"), 404, "not_found")
    assert a.get_key(ka["id"])["status"] == "active"

    a_ids = {k["id"] for k in as_json(a.call("GET", "/v1/keys"))["data"]}
    b_ids = {k["id"] for k in as_json(b.call("GET", "/v1/keys"))["data"]}
    assert a_ids == {ka["id"]}
    assert b_ids == {kb_["id"]}


def test_unknown_key_id_is_404(tenant):
    """GET and DELETE of a key id that never existed are 404 not_found."""
    assert_control_error(tenant.call("GET", "/v1/keys/key_doesnotexist"), 404, "not_found")
    assert_control_error(tenant.call("DELETE", "/v1/keys/key_doesnotexist"), 404, "not_found")


def test_oversized_bodies_and_unreadable_paths_get_the_json_error_body(tenant):
    """Errors raised before a handler runs keep SPEC §3's body: a request body over
    64 KiB is 413 body_too_large (the server does not buffer megabytes for anyone), a
    path that is not UTF-8 is 400 invalid_request."""
    big = key_body(metadata={"pad": "x" * (70 * 1024)})
    assert_control_error(tenant.call("POST", "/v1/keys", json=big), 413, "body_too_large")
    assert_control_error(tenant.call("GET", "/v1/keys/%FF"), 400, "invalid_request")
    # Below the limit, the usual validation answers (metadata is limited to 8 KiB).
    small = key_body(metadata={"pad": "x" * (20 * 1024)})
    assert_control_error(tenant.call("POST", "/v1/keys", json=small), 400, "invalid_request")


def test_list_keys_pages_with_limit_and_cursor(tenant):
    """GET /v1/keys?limit=2 returns at most 2 keys and a next_cursor; following the
    cursors returns every key exactly once and ends with next_cursor null."""
    issued = {tenant.issue_key(**key_body(label=f"k{i}"))["id"] for i in range(5)}
    seen = []
    cursor = None
    for _ in range(10):
        params = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = tenant.call("GET", "/v1/keys", params=params)
        assert r.status_code == 200, r.text
        page = as_json(r)
        assert len(page["data"]) <= 2
        for item in page["data"]:
            assert KEY_FIELDS <= set(item), sorted(item)
            assert "token" not in item
        seen += [k["id"] for k in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert cursor is None, "pagination did not end within 10 pages"
    assert len(seen) == len(set(seen)) == 5
    assert set(seen) == issued
    first = as_json(tenant.call("GET", "/v1/keys", params={"limit": 2}))
    assert len(first["data"]) == 2 and first["next_cursor"]


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": -1}, {"limit": "abc"}, {"cursor": "garbage!!"}, {"status": "bogus"},
     [("status", "revoked"), ("status", "active")], [("limit", "1"), ("limit", "100")]],
    ids=lambda p: repr(p),
)
def test_list_keys_rejects_bad_filters(tenant, params):
    """A bad limit, cursor or status filter is 400 invalid_request, and so is one given
    twice (which of the two would apply is not for the server to guess)."""
    assert_control_error(tenant.call("GET", "/v1/keys", params=params), 400, "invalid_request")


def test_list_keys_filters_by_status(tenant):
    """status=active|revoked|expired each return exactly the keys in that state."""
    active = tenant.issue_key(**key_body(label="active"))
    revoked = tenant.issue_key(**key_body(label="revoked"))
    expired = tenant.issue_key(**key_body(label="expired", expires_in="1s"))
    assert tenant.revoke(revoked["id"]).status_code == 200
    time.sleep(max(0.0, parse_ts(expired["expires_at"]) - time.time()) + 1.5)

    def ids(status):
        r = tenant.call("GET", "/v1/keys", params={"status": status})
        assert r.status_code == 200, r.text
        data = as_json(r)["data"]
        assert all(k["status"] == status for k in data), data
        return {k["id"] for k in data}

    assert ids("active") == {active["id"]}
    assert ids("revoked") == {revoked["id"]}
    assert ids("expired") == {expired["id"]}
    assert tenant.get_key(expired["id"])["status"] == "expired"
    everything = {k["id"] for k in as_json(tenant.call("GET", "/v1/keys"))["data"]}
    assert everything == {active["id"], revoked["id"], expired["id"]}


def test_revoking_a_key_is_idempotent(tenant):
    """DELETE /v1/keys/{id} → 200 {id, status: revoked}, again on repeat; the key shows
    status revoked and a revoked_at that does not move on the second DELETE."""
    k = tenant.issue_key(**VALID_KEY)
    r1 = tenant.revoke(k["id"])
    assert r1.status_code == 200, r1.text
    assert {"id": k["id"], "status": "revoked"}.items() <= r1.json().items()
    first = tenant.get_key(k["id"])
    assert first["status"] == "revoked"
    assert abs(parse_ts(first["revoked_at"]) - time.time()) < 120
    time.sleep(1.1)
    r2 = tenant.revoke(k["id"])
    assert r2.status_code == 200, r2.text
    assert {"id": k["id"], "status": "revoked"}.items() <= r2.json().items()
    assert tenant.get_key(k["id"])["revoked_at"] == first["revoked_at"]


# --------------------------------------------------------------------------- JWKS / signing keys


def test_issued_token_verifies_against_the_public_jwks(keybrake, tenant):
    """GET /v1/jwks (public) lists Ed25519 keys; an issued vault key is vk_ + an EdDSA
    JWT whose kid is in the JWKS, whose signature verifies, and whose claims carry the
    key's scope (jti, ten, ven, eps, cap in micro-USD, iat, exp, lbl)."""
    r = requests.get(f"{keybrake.control_url}/v1/jwks", timeout=10)
    assert r.status_code == 200
    keys = r.json()["keys"]
    assert keys
    for k in keys:
        assert k["kty"] == "OKP" and k["crv"] == "Ed25519" and k["alg"] == "EdDSA" and k["use"] == "sig"
        assert k["kid"] and k["x"]
        assert "d" not in k, "private key material in the JWKS"

    issued = tenant.issue_key(**key_body(daily_usd_cap=12.5))
    header, _, _ = token_parts(issued["token"])
    assert header["alg"] == "EdDSA"
    claims = verify_with_jwks(keybrake, issued["token"])
    assert claims["jti"] == issued["id"]
    assert claims["ten"] == tenant.id
    assert claims["ven"] == "stripe"
    assert claims["eps"] == VALID_KEY["allowed_endpoints"]
    assert claims["cap"] == 12_500_000
    assert claims["lbl"] == VALID_KEY["label"]
    assert claims["exp"] == int(parse_ts(issued["expires_at"]))
    assert abs(claims["iat"] - time.time()) < 120
    assert claims["exp"] - claims["iat"] == 300


def test_signing_key_rotation_keeps_old_tokens_working(keybrake, tenant, fake_stripe):
    """After POST /v1/admin/signing-keys/rotate → 200 {kid}: new keys carry the new kid,
    the old kid stays in the JWKS, and a token signed before the rotation still
    verifies and still works through the proxy."""
    old = tenant.issue_key(**key_body(allowed_endpoints=["GET /v1/customers"]))
    old_kid = token_parts(old["token"])[0]["kid"]

    r = keybrake.admin("POST", "/v1/admin/signing-keys/rotate")
    assert r.status_code == 200, r.text
    new_kid = r.json()["kid"]
    assert new_kid and new_kid != old_kid

    new = tenant.issue_key(**key_body(allowed_endpoints=["GET /v1/customers"]))
    assert token_parts(new["token"])[0]["kid"] == new_kid
    kids = {k["kid"] for k in jwks(keybrake)}
    assert {old_kid, new_kid} <= kids
    verify_with_jwks(keybrake, old["token"])
    verify_with_jwks(keybrake, new["token"])

    for token in (old["token"], new["token"]):
        r = keybrake.proxy("GET", "/stripe/v1/customers", key=token)
        assert r.status_code == 200, r.text
    assert len(fake_stripe.received_matching("GET", "/v1/customers")) == 2


# --------------------------------------------------------------------------- audit


def test_audit_records_allowed_and_denied_calls_newest_first(keybrake, tenant, fake_stripe):
    """Every proxied call becomes an audit event (within ~1 s): ts, key_id, label,
    vendor, method, path, status, decision (allowed or the denial code), spend_usd,
    vendor_request_id, duration_ms — newest first, filterable by key_id, pageable."""
    k = tenant.issue_key(**key_body(label="audit-me", allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=20))
    other = tenant.issue_key(**key_body(label="other"))
    r = keybrake.proxy("POST", "/stripe/v1/payment_intents", key=k["token"], data={"amount": 500, "currency": "usd"})
    assert r.status_code == 200, r.text
    time.sleep(0.05)
    r = keybrake.proxy("GET", "/stripe/v1/customers", key=k["token"])
    assert_denied(r, 403, "endpoint_not_allowed")
    keybrake.proxy("GET", "/stripe/v1/customers", key=other["token"])

    assert wait_until(lambda: len(tenant.audit(key_id=k["id"])) >= 2, timeout=10)
    events = tenant.audit(key_id=k["id"])
    assert len(events) == 2, events
    denied, allowed = events
    fields = {"ts", "key_id", "label", "vendor", "method", "path", "status", "decision", "spend_usd",
              "vendor_request_id", "duration_ms"}
    for e in events:
        assert fields <= set(e), sorted(e)
        assert e["key_id"] == k["id"] and e["label"] == "audit-me" and e["vendor"] == "stripe"
        parse_ts(e["ts"])
        assert isinstance(e["duration_ms"], (int, float, Decimal)) and e["duration_ms"] >= 0
    assert parse_ts(denied["ts"]) >= parse_ts(allowed["ts"])

    assert allowed["decision"] == "allowed"
    assert allowed["status"] == 200
    assert allowed["method"] == "POST"
    assert allowed["path"] in ("/v1/payment_intents", "/stripe/v1/payment_intents")
    assert allowed["spend_usd"] == 5

    assert denied["decision"] == "endpoint_not_allowed"
    assert denied["status"] == 403
    assert denied["method"] == "GET"
    assert denied["path"] in ("/v1/customers", "/stripe/v1/customers")
    assert denied["spend_usd"] == 0

    # limit + cursor
    r = tenant.call("GET", "/v1/audit", params={"key_id": k["id"], "limit": 1})
    assert r.status_code == 200
    page = as_json(r)
    assert [e["decision"] for e in page["data"]] == ["endpoint_not_allowed"]
    assert page["next_cursor"]
    r = tenant.call("GET", "/v1/audit", params={"key_id": k["id"], "limit": 1, "cursor": page["next_cursor"]})
    assert [e["decision"] for e in as_json(r)["data"]] == ["allowed"]

    # since
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    assert tenant.audit(key_id=k["id"], since=future) == []
    assert len(tenant.audit(key_id=k["id"], since=past)) == 2

    # all of the tenant's events without key_id filter
    assert wait_until(lambda: len(tenant.audit()) >= 3, timeout=10)


def test_audit_records_revoked_and_capped_calls(keybrake, tenant, fake_stripe):
    """Denials by revocation and by the cap are audited with their codes and statuses."""
    k = tenant.issue_key(**key_body(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=1))
    form = {"amount": 100, "currency": "usd"}
    assert keybrake.proxy("POST", "/stripe/v1/payment_intents", key=k["token"], data=form).status_code == 200
    assert_denied(keybrake.proxy("POST", "/stripe/v1/payment_intents", key=k["token"], data=form), 429, "cap_exhausted")
    assert tenant.revoke(k["id"]).status_code == 200
    assert_denied(keybrake.proxy("POST", "/stripe/v1/payment_intents", key=k["token"], data=form), 401, "key_revoked")
    assert wait_until(lambda: len(tenant.audit(key_id=k["id"])) >= 3, timeout=10)
    events = tenant.audit(key_id=k["id"])
    assert [(e["decision"], e["status"]) for e in events] == [
        ("key_revoked", 401), ("cap_exhausted", 429), ("allowed", 200)]
    assert [e["spend_usd"] for e in events] == [0, 0, 1]


def test_audit_is_private_to_the_tenant(keybrake, tenant):
    """Another tenant sees none of A's audit events, even when filtering by A's key id."""
    k = tenant.issue_key(**key_body(allowed_endpoints=["GET /v1/customers"]))
    keybrake.proxy("GET", "/stripe/v1/customers", key=k["token"])
    assert wait_until(lambda: tenant.audit(key_id=k["id"]), timeout=10)
    b = keybrake.create_tenant("b")
    r = b.call("GET", "/v1/audit", params={"key_id": k["id"]})
    assert r.status_code in (200, 404), r.text
    if r.status_code == 200:
        assert as_json(r)["data"] == []
    assert as_json(b.call("GET", "/v1/audit"))["data"] == []


def test_audit_rejects_bad_parameters(tenant):
    """Bad limit, cursor or since on GET /v1/audit is 400 invalid_request."""
    for params in ({"limit": 0}, {"limit": "x"}, {"cursor": "garbage!!"}, {"since": "yesterday"}):
        assert_control_error(tenant.call("GET", "/v1/audit", params=params), 400, "invalid_request")


# --------------------------------------------------------------------------- persistence


def test_restart_on_the_same_data_dir_keeps_all_state(keybrake, tenant, fake_stripe, stripe_secret):
    """SIGTERM stops the server cleanly (exit 0); restarted on the same data dir it still
    has the tenants, credential metadata, keys, revocations, signing keys and audit
    events, and it still proxies with the stored (decrypted) vendor secret."""
    live = tenant.issue_key(**key_body(label="live", allowed_endpoints=["GET /v1/customers"]))
    dead = tenant.issue_key(**key_body(label="dead", allowed_endpoints=["GET /v1/customers"]))
    assert keybrake.proxy("GET", "/stripe/v1/customers", key=live["token"]).status_code == 200
    assert tenant.revoke(dead["id"]).status_code == 200
    assert wait_until(lambda: tenant.audit(key_id=live["id"]), timeout=10)

    before = {
        "tenants": keybrake.admin("GET", "/v1/tenants").json()["data"],
        "credential": tenant.call("GET", "/v1/vendors/stripe/credential").json(),
        "live": tenant.get_key(live["id"]),
        "dead": tenant.get_key(dead["id"]),
        "audit": tenant.audit(key_id=live["id"]),
        "kids": {k["kid"] for k in jwks(keybrake)},
    }

    assert keybrake.stop(signal.SIGTERM) == 0, keybrake.logs()[-3000:]
    keybrake.start()

    assert keybrake.admin("GET", "/v1/tenants").json()["data"] == before["tenants"]
    assert tenant.call("GET", "/v1/vendors/stripe/credential").json() == before["credential"]
    after_live = tenant.get_key(live["id"])
    for field in ("id", "label", "allowed_endpoints", "daily_usd_cap", "expires_at", "created_at", "status"):
        assert after_live[field] == before["live"][field], field
    assert tenant.get_key(dead["id"]) == before["dead"]
    assert tenant.audit(key_id=live["id"]) == before["audit"]
    assert before["kids"] <= {k["kid"] for k in jwks(keybrake)}

    r = keybrake.proxy("GET", "/stripe/v1/customers", key=live["token"])
    assert r.status_code == 200, r.text
    assert_denied(keybrake.proxy("GET", "/stripe/v1/customers", key=dead["token"]), 401, "key_revoked")
    assert fake_stripe.received()[-1].authorization == f"Bearer {stripe_secret}"


def test_vendor_secret_and_api_tokens_are_not_stored_in_plaintext(keybrake, tenant, stripe_secret, backend):
    """The store never contains the vendor secret, the tenant's API token or the admin
    token in plaintext — while running and after shutdown: neither the SQLite file (and
    its -wal/-shm) nor PostgreSQL's files (heap, WAL) and a pg_dump of the database."""
    tenant.issue_key(**VALID_KEY)

    needles = {
        "vendor secret": stripe_secret.encode(),
        "vendor secret body": stripe_secret[8:].encode(),
        "tenant api token": tenant.token.encode(),
        "admin token": keybrake.admin_token.encode(),
    }
    for moment in ("running", "stopped"):
        if moment == "stopped":
            keybrake.stop()
        files = keybrake.stored_bytes()
        assert ("keybrake.db" if backend == "sqlite" else "pg_dump") in files
        for name, data in files.items():
            for what, needle in needles.items():
                assert needle not in data, f"{what} in plaintext in {name} ({moment})"
            # also not as UTF-16 or hex
            assert stripe_secret.encode().hex().encode() not in data, f"vendor secret hex in {name}"


@DATA_DIR_ONLY
def test_generated_master_key_and_admin_token_when_env_is_absent(keybrake_factory, fake_stripe, stripe_secret):
    """Without KEYBRAKE_ADMIN_TOKEN / KEYBRAKE_MASTER_KEY, serve generates both, stores
    them in the data dir with mode 0600, logs their paths but never their values, and
    reuses them on restart (the stored credential still decrypts)."""
    kb = keybrake_factory(
        {"stripe": fake_stripe.url},
        env_overrides={"KEYBRAKE_ADMIN_TOKEN": None, "KEYBRAKE_MASTER_KEY": None},
    )
    generated = [
        p for p in kb.data_dir.iterdir()
        # The databases and the process's lock file (empty) are not secrets.
        if p.is_file() and not p.name.startswith(("keybrake.db", "audit.db", "keybrake.lock"))
    ]
    assert len(generated) >= 2, f"expected generated secret files in {kb.data_dir}: {[p.name for p in generated]}"
    assert not [p for p in generated if ".tmp" in p.name], "a temporary secret file was left behind"
    mode = stat.S_IMODE(os.stat(kb.data_dir).st_mode)
    assert mode == 0o700, f"the data dir Keybrake created has mode {oct(mode)}"
    logs = kb.logs()
    admin_token = None
    for p in generated:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode == 0o600, f"{p.name} has mode {oct(mode)}"
        assert p.name in logs, f"path of {p.name} not logged"
        value = p.read_text(errors="replace").strip()
        assert value and value not in logs, f"value of {p.name} appears in the logs"
        r = requests.get(f"{kb.control_url}/v1/tenants", headers={"Authorization": f"Bearer {value}"}, timeout=10)
        if r.status_code == 200:
            admin_token = value
    assert admin_token, "no generated file holds a working admin token"

    kb.admin_token = admin_token
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    k = t.issue_key(**key_body(allowed_endpoints=["GET /v1/customers"]))

    kb.stop()
    kb.start()
    assert kb.admin("GET", "/v1/tenants").status_code == 200
    r = kb.proxy("GET", "/stripe/v1/customers", key=k["token"])
    assert r.status_code == 200, r.text
    assert fake_stripe.received()[-1].authorization == f"Bearer {stripe_secret}"


@DATA_DIR_ONLY
def test_a_data_dir_others_can_read_is_reported(keybrake_factory, fake_stripe):
    """A data dir that already exists keeps its mode, but if group or others can enter
    it (the databases and the generated master key are inside), serve warns at start."""
    kb = keybrake_factory({"stripe": fake_stripe.url}, start=False)
    kb.data_dir.mkdir(parents=True)
    os.chmod(kb.data_dir, 0o755)
    kb.start()
    logs = kb.logs()
    assert "has mode 755" in logs and str(kb.data_dir) in logs, logs[-2000:]


# --------------------------------------------------------------------------- configuration


def test_config_file_sets_key_lifetimes_and_flags_win(keybrake_factory, fake_stripe, stripe_secret, tmp_path):
    """default_key_ttl and max_key_ttl come from --config; a listen address given both
    in the file and as a flag is taken from the flag."""
    config = write_config(
        tmp_path / "conf",
        default_key_ttl="10m",
        max_key_ttl="1h",
        control_listen="127.0.0.1:1",
        proxy_listen="127.0.0.1:2",
        metrics_listen="127.0.0.1:3",
    )
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)  # ready on the flag's ports
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    r = t.call("POST", "/v1/keys", json=key_body(expires_in=_DROP))
    assert r.status_code == 201, r.text
    assert abs(parse_ts(as_json(r)["expires_at"]) - (time.time() + 600)) < 30
    assert t.call("POST", "/v1/keys", json=key_body(expires_in="1h")).status_code == 201
    assert_control_error(t.call("POST", "/v1/keys", json=key_body(expires_in="2h")), 400, "invalid_expires_in")
    assert_control_error(t.call("POST", "/v1/keys", json=key_body(expires_in=3601)), 400, "invalid_expires_in")


def test_idle_control_connections_are_closed(keybrake_factory, fake_stripe, tmp_path):
    """A control API connection that sends nothing (or stops halfway through its headers)
    is closed after control.header_timeout_ms, while a client that keeps talking is served."""
    config = write_config(tmp_path / "conf", control={"header_timeout_ms": 1000})
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config)
    silent = socket.create_connection(("127.0.0.1", kb.control_port), timeout=10)
    halfway = socket.create_connection(("127.0.0.1", kb.control_port), timeout=10)
    halfway.sendall(b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    for s in (silent, halfway):
        assert s.recv(1024) == b"", "the server should close an idle connection"
        s.close()
    waited = time.monotonic() - start
    assert 0.5 < waited < 8, f"closed after {waited:.1f} s"
    # Keep-alive clients that keep talking are not affected.
    with requests.Session() as session:
        for _ in range(3):
            r = session.get(f"{kb.control_url}/healthz", timeout=10)
            assert r.status_code == 200
            time.sleep(0.4)


def test_master_key_from_a_file_survives_restart(keybrake_factory, fake_stripe, stripe_secret, tmp_path):
    """--master-key-file (systemd LoadCredential=) replaces KEYBRAKE_MASTER_KEY; after a
    restart with the same file the stored vendor secret still decrypts and proxies."""
    import base64

    key_file = tmp_path / "master.key"
    key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    os.chmod(key_file, 0o600)
    kb = keybrake_factory(
        {"stripe": fake_stripe.url},
        extra_args=["--master-key-file", str(key_file)],
        env_overrides={"KEYBRAKE_MASTER_KEY": None},
    )
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    k = t.issue_key(**key_body(allowed_endpoints=["GET /v1/customers"]))
    kb.stop()
    kb.start()
    r = kb.proxy("GET", "/stripe/v1/customers", key=k["token"])
    assert r.status_code == 200, r.text
    assert fake_stripe.received()[-1].authorization == f"Bearer {stripe_secret}"
    assert key_file.read_text().strip() not in kb.logs()


@pytest.mark.sqlite_only("steps the clock of `serve`, whose proxy checks revocations in process")
def test_a_clock_stepped_forward_and_back_does_not_forget_a_revocation(
        keybrake_factory, fake_stripe, stripe_secret, tmp_path):
    """`serve`'s wall clock stepped 2 hours forward for long enough for its upkeep to run
    (30 s), then back, as a wrong NTP source or a restored VM does. Its revoked key's
    token is still valid by the true time: the revocation must still hold (it is kept a
    day past the key's expiry), not be dropped as expired and the key spend again."""
    offset = tmp_path / "clock-offset"
    kb = keybrake_factory({"stripe": fake_stripe.url}, env_overrides=steppable_clock(offset))
    tenant = kb.create_tenant("stepped")
    tenant.put_credential("stripe", stripe_secret)
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10,
                           expires_in="1h")

    def pay():
        return kb.proxy("POST", "/stripe/v1/payment_intents", key=key["token"],
                        data={"amount": 100, "currency": "usd"})

    assert pay().status_code == 200
    assert tenant.revoke(key["id"]).status_code in (200, 204)
    assert_denied(pay(), 401, "key_revoked")
    offset.write_text("+2h\n")
    assert wait_until(lambda: pay().json().get("code") == "key_expired", timeout=5, interval=0.2)
    time.sleep(32)  # the upkeep that drops revocations runs every 30 s
    offset.write_text("+0\n")
    assert wait_until(lambda: pay().json().get("code") != "key_expired", timeout=5, interval=0.2)
    assert_denied(pay(), 401, "key_revoked")
    paid = [r for r in fake_stripe.received_matching("POST", "/v1/payment_intents") if r.status == 200]
    assert len(paid) == 1


@pytest.mark.sqlite_only("steps `serve`'s clock; on PostgreSQL the cut-off is the database server's "
                         "clock, which libfaketime does not move (the deletion's SQL: unit test "
                         "expired_keys_are_deleted_with_their_ledger_rows_on_postgres)")
def test_keys_expired_past_their_retention_are_deleted_with_their_ledger_rows(
        keybrake_factory, fake_stripe, stripe_secret, tmp_path):
    """A fleet issues a key per agent invocation: expired keys must not fill the store
    forever. A key that expired more than `expired_key_retention` (30 days) ago is deleted
    with its ledger rows; its audit trail stays. A key expired since, and a live key, are
    untouched, and the live key still spends from its cap. A clock far ahead at start
    deletes nothing until keys are issued under it."""
    import sqlite3

    offset = tmp_path / "clock-offset"
    config = write_config(tmp_path / "conf", max_key_ttl="60d")
    kb = keybrake_factory({"stripe": fake_stripe.url}, config=config,
                          env_overrides=steppable_clock(offset))
    tenant = kb.create_tenant("retention")
    tenant.put_credential("stripe", stripe_secret)
    endpoints = ["POST /v1/payment_intents"]
    old = tenant.issue_key(allowed_endpoints=endpoints, daily_usd_cap=10, expires_in="30s")
    # More than one transaction's worth (500 keys), never used.
    unused = [tenant.issue_key(allowed_endpoints=endpoints, daily_usd_cap=1, expires_in="30s")["id"]
              for _ in range(520)]
    recent = tenant.issue_key(allowed_endpoints=endpoints, daily_usd_cap=10, expires_in="10d")
    live = tenant.issue_key(allowed_endpoints=endpoints, daily_usd_cap=10, expires_in="40d")

    def pay(key):
        return kb.proxy("POST", "/stripe/v1/payment_intents", key=key["token"],
                        data={"amount": 300, "currency": "usd"})

    def ledger_rows(key):
        with sqlite3.connect(f"file:{kb.db_path}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM ledger WHERE key_id = ?", (key["id"],)).fetchone()[0]

    def keys_left():
        with sqlite3.connect(f"file:{kb.db_path}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM keys").fetchone()[0]

    for key in (old, recent, live):
        assert pay(key).status_code == 200
    assert wait_until(lambda: len(tenant.audit(key_id=old["id"])) == 1, timeout=10)

    # Started with its clock 31 days ahead, no key issued since: nothing is deleted.
    kb.stop()
    offset.write_text("+31d\n")
    kb.start()
    time.sleep(2)
    assert "expired keys deleted" not in kb.logs()
    assert tenant.get_key(old["id"])["status"] == "expired"
    assert keys_left() == 523

    # A key issued on that clock: the next round (here at the next start) deletes.
    later = tenant.issue_key(allowed_endpoints=endpoints, daily_usd_cap=10, expires_in="5m")
    assert parse_ts(later["expires_at"]) > time.time() + 30 * 86_400
    kb.restart()
    assert wait_until(lambda: "expired keys deleted with their ledger rows: 521 " in kb.logs(), timeout=10), \
        kb.logs()[-2000:]
    assert keys_left() == 3
    assert_control_error(tenant.call("GET", f"/v1/keys/{old['id']}"), 404, "not_found")
    assert_control_error(tenant.call("GET", f"/v1/keys/{unused[-1]}"), 404, "not_found")
    listed = [k["id"] for k in tenant.call("GET", "/v1/keys?limit=100").json()["data"]]
    assert listed == [later["id"], live["id"], recent["id"]]
    assert tenant.get_key(recent["id"])["status"] == "expired"
    assert tenant.get_key(live["id"])["status"] == "active"
    assert [ledger_rows(k) for k in (old, recent, live)] == [0, 1, 1]
    [event] = tenant.audit(key_id=old["id"])
    assert Decimal(str(event["spend_usd"])) == Decimal("3")
    assert_denied(pay(old), 401, "key_expired")
    assert pay(live).status_code == 200
    assert Decimal(str(tenant.get_key(live["id"])["spent_today_usd"])) == Decimal("3")


def test_money_below_a_cent_is_written_in_plain_decimals(tenant):
    """Money is a JSON number in USD, exact to the micro-dollar: `0.000001`, never the
    exponent form `1e-6` a float serializer writes for small values (a person reading
    the answer, or a parser of decimals, sees money)."""
    issued = tenant.call("POST", "/v1/keys", json={**VALID_KEY, "daily_usd_cap": 0.000001})
    assert issued.status_code == 201, issued.text
    assert '"daily_usd_cap":0.000001' in issued.text.replace(" ", ""), issued.text
    shown = tenant.call("GET", f"/v1/keys/{issued.json()['id']}")
    assert '"daily_usd_cap":0.000001' in shown.text.replace(" ", ""), shown.text
    assert shown.json()["daily_usd_cap"] == 0.000001
