"""The `keybrake` CLI against a real `keybrake serve`, and against a control replica on
PostgreSQL (conftest.py's both backends): what an operator types and reads.

Each command is checked by its output; errors are one clear line and a non-zero exit.
"""

import json
import os
import re
import subprocess

import pytest

from harness import KEYBRAKE_BIN

pytestmark = pytest.mark.both_backends


def kb(keybrake, *args, token=None, admin=False, stdin=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    env["KEYBRAKE_CONTROL_URL"] = keybrake.control_url
    if admin:
        env["KEYBRAKE_ADMIN_TOKEN"] = keybrake.admin_token
    if token:
        env["KEYBRAKE_TOKEN"] = token
    done = subprocess.run(
        [str(KEYBRAKE_BIN), *args], env=env, input=stdin, capture_output=True, text=True, timeout=30
    )
    keybrake.settle()
    return done


def test_cli_issue_show_revoke_and_audit_a_key(keybrake, fake_stripe, tmp_path):
    """tenant create → vendor set (secret from a file) → key issue → show → proxied call →
    revoke → the call is refused → audit lists both calls, newest first."""
    created = kb(keybrake, "tenant", "create", "cli-co", "--json", admin=True)
    assert created.returncode == 0, created.stderr
    tenant = json.loads(created.stdout)
    assert tenant["id"].startswith("tn_") and tenant["api_token"].startswith("kb_")
    token = tenant["api_token"]

    secret_file = tmp_path / "stripe.secret"
    secret_file.write_text("sk_test_cli_" + "7" * 24 + "\n")
    secret_file.chmod(0o644)
    stored = kb(keybrake, "vendor", "set", "stripe", "--secret-file", str(secret_file), token=token)
    assert stored.returncode == 0, stored.stderr
    assert "…7777" in stored.stdout and "sk_test_cli" not in stored.stdout
    # Stored, with a warning that others can read the file; none once it is private.
    assert "has mode 644: other users can read it" in stored.stderr, stored.stderr
    secret_file.chmod(0o600)
    stored = kb(keybrake, "vendor", "set", "stripe", "--secret-file", str(secret_file), token=token)
    assert stored.returncode == 0 and stored.stderr == "", stored.stderr

    issued = kb(
        keybrake, "key", "issue", "--vendor", "stripe", "--endpoint", "POST /v1/payment_intents",
        "--cap", "25", "--ttl", "5m", "--label", "cli-run", token=token,
    )
    assert issued.returncode == 0, issued.stderr
    vault_key = issued.stdout.strip()
    assert vault_key.startswith("vk_ey") and "\n" not in vault_key
    # Its id, for `key show`/`revoke`, on stderr (stdout stays the token alone).
    assert re.fullmatch(r"issued (key_\w+) \(expires \S+\)\n", issued.stderr), issued.stderr
    issued_id = issued.stderr.split()[1]

    # The tenant token from a file instead of the environment.
    token_file = tmp_path / "tenant.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    from_file = kb(keybrake, "key", "list", "--token-file", str(token_file))
    assert from_file.returncode == 0 and "cli-run" in from_file.stdout, from_file.stderr
    missing = kb(keybrake, "key", "list")
    assert missing.returncode == 1 and "--token-file" in missing.stderr, missing.stderr

    listed = json.loads(kb(keybrake, "key", "list", "--json", token=token).stdout)
    key_id = listed["data"][0]["id"]
    assert key_id == issued_id
    shown = kb(keybrake, "key", "show", key_id, token=token)
    assert shown.returncode == 0, shown.stderr
    assert f"id:              {key_id}" in shown.stdout
    assert "status:          active" in shown.stdout
    assert "daily cap:       $25\n" in shown.stdout
    assert "spent today:     $0 (held $0)" in shown.stdout
    assert "allowed:         POST /v1/payment_intents" in shown.stdout

    ok = keybrake.proxy("POST", "/stripe/v1/payment_intents", key=vault_key,
                        data={"amount": "500", "currency": "usd"})
    assert ok.status_code == 200, ok.text

    revoked = kb(keybrake, "key", "revoke", key_id, token=token)
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"{key_id} revoked"
    again = kb(keybrake, "key", "revoke", key_id, token=token)
    assert again.returncode == 0, "revoking twice is fine"
    assert "status:          revoked" in kb(keybrake, "key", "show", key_id, token=token).stdout

    refused = keybrake.proxy("POST", "/stripe/v1/payment_intents", key=vault_key,
                             data={"amount": "500", "currency": "usd"})
    assert refused.status_code == 401 and refused.json()["code"] == "key_revoked"

    def audit_lines():
        out = kb(keybrake, "audit", "--key", key_id, token=token)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if line.strip()]

    import time
    deadline = time.time() + 10
    lines = audit_lines()
    while len(lines) < 2 and time.time() < deadline:
        time.sleep(0.2)
        lines = audit_lines()
    assert len(lines) == 2, lines
    assert "401" in lines[0] and "key_revoked" in lines[0]
    assert "200" in lines[1] and "allowed" in lines[1] and " $5 " in lines[1]

    # A pattern reaching calls the proxy refuses for a capped key: warned on stderr, the
    # token alone on stdout.
    broad = kb(keybrake, "key", "issue", "--vendor", "stripe", "--endpoint", "/v1/**", "--cap", "5",
               token=token)
    assert broad.returncode == 0, broad.stderr
    assert broad.stdout.strip().startswith("vk_ey") and "\n" not in broad.stdout.strip()
    assert broad.stderr.startswith("warning: ") and "endpoint_unmetered" in broad.stderr, broad.stderr

    # Two keys, a page of one: the rest is one --cursor away, said on stderr.
    first = kb(keybrake, "key", "list", "--limit", "1", token=token)
    assert first.returncode == 0 and len(first.stdout.splitlines()) == 1, first
    assert first.stderr.startswith("more: --cursor "), first.stderr
    cursor = first.stderr.split()[-1]
    second = kb(keybrake, "key", "list", "--limit", "1", "--cursor", cursor, token=token)
    assert second.returncode == 0 and second.stdout.split()[0] == key_id, second.stdout
    assert first.stdout.split()[0] != key_id


def test_cli_errors_are_one_clear_line_and_a_nonzero_exit(keybrake, tmp_path):
    """Wrong token, unknown key, unconfigured vendor, missing secret file, missing token."""
    token = json.loads(kb(keybrake, "tenant", "create", "err-co", "--json", admin=True).stdout)["api_token"]
    cases = [
        (kb(keybrake, "key", "list", token="kb_not_a_real_token"), "401 invalid_token"),
        (kb(keybrake, "key", "show", "key_does_not_exist", token=token), "404 not_found"),
        (kb(keybrake, "key", "issue", "--vendor", "stripe", "--endpoint", "/v1/charges", "--cap", "5",
            token=token), "422 vendor_not_configured"),
        (kb(keybrake, "key", "issue", "--vendor", "stripe", "--endpoint", "v1/charges", "--cap", "5",
            token=token), "400 invalid_endpoint_pattern"),
        (kb(keybrake, "vendor", "set", "stripe", "--secret-file", str(tmp_path / "missing"), token=token),
         "cannot read"),
        # A vault key where the vendor's secret belongs (from stdin).
        (kb(keybrake, "vendor", "set", "stripe", "--secret-file", "-", token=token, stdin="vk_eyJhbGc\n"),
         "holds a Keybrake vault key"),
        (kb(keybrake, "key", "list"), "KEYBRAKE_TOKEN"),
        # An admin command with only the tenant's variable set names the admin's.
        (kb(keybrake, "tenant", "list", token=token), "set KEYBRAKE_ADMIN_TOKEN"),
        # The README's placeholder pasted as is.
        (kb(keybrake, "key", "list", token="kb_\u2026"), "give the whole token as it was printed"),
        # The proxy's or the metrics listener's address given for the control API's.
        (kb(keybrake, "key", "list", "--control-url", keybrake.proxy_url, token=token),
         "not Keybrake's control API"),
        (kb(keybrake, "key", "list", "--control-url", keybrake.metrics_url, token=token),
         "not Keybrake's control API"),
    ]
    for result, expected in cases:
        assert result.returncode != 0, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr


def test_cli_rotates_a_tenants_api_token(keybrake):
    """tenant create prints the first token's id → add-token → delete-token of the first:
    the old token is refused at once, the new one works."""
    created = kb(keybrake, "tenant", "create", "rotate-co", admin=True)
    assert created.returncode == 0, created.stderr
    fields = dict(line.split(": ", 1) for line in created.stdout.splitlines() if ": " in line)
    old_id, old = fields["api token id"], fields["api token (shown once)"]
    assert old.startswith("kb_") and old_id and old_id != "?", created.stdout
    tenant_id = created.stdout.split()[1]
    assert kb(keybrake, "key", "list", token=old).returncode == 0

    added = kb(keybrake, "tenant", "add-token", tenant_id, "--json", admin=True)
    assert added.returncode == 0, added.stderr
    new = json.loads(added.stdout)["api_token"]

    deleted = kb(keybrake, "tenant", "delete-token", tenant_id, old_id, admin=True)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == f"api token {old_id} deleted"
    refused = kb(keybrake, "key", "list", token=old)
    assert refused.returncode != 0 and "401 invalid_token" in refused.stderr, refused.stderr
    assert kb(keybrake, "key", "list", token=new).returncode == 0
    again = kb(keybrake, "tenant", "delete-token", tenant_id, old_id, admin=True)
    assert again.returncode != 0 and "404 not_found" in again.stderr, again.stderr


def test_cli_id_arguments_never_address_another_object(keybrake, tenant):
    """An id argument is an id: `key revoke ../vendors/stripe/credential` (the HTTP client
    would resolve the `..`) or `node delete ../tenants/…` is refused before anything is
    sent, and the credential, the tenant's token and the key stay as they were."""
    key = tenant.issue_key(vendor="stripe", allowed_endpoints=["POST /v1/payment_intents"],
                           daily_usd_cap=5)
    tenant_id = tenant.id
    for args, token, admin in [
        (("key", "revoke", "../vendors/stripe/credential"), tenant.token, False),
        (("key", "show", f"{key['id']}/../../vendors/stripe/credential"), tenant.token, False),
        (("vendor", "delete", "stripe/.."), tenant.token, False),
        (("node", "delete", f"../tenants/{tenant_id}/api_tokens/x"), None, True),
        (("tenant", "delete-token", "..", "x"), None, True),
        (("key", "revoke", ".."), tenant.token, False),
    ]:
        done = kb(keybrake, *args, token=token, admin=admin)
        assert done.returncode != 0, (args, done.stdout)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "is not an id or a vendor name" in lines[0], done.stderr
    assert tenant.call("GET", "/v1/vendors/stripe/credential").status_code == 200
    assert tenant.get_key(key["id"])["status"] == "active"
    assert kb(keybrake, "key", "list", token=tenant.token).returncode == 0
