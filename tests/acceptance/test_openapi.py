"""docs/openapi.yaml against the running control API: every documented path and method is
served (not the 404 of an unknown route, not 405), every other standard method on a
documented path is 405, a documented `security` is what the server asks for, and the
answer to each call is a documented status with the documented error shape. The served
operations are checked on both storage backends (conftest.py); the routing-only checks
(405s, unknown routes) do not depend on storage and run on SQLite."""

import re

import pytest
import requests
import yaml

from harness import REPO, HTTP_TIMEOUT_S

SPEC = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
METHODS = ["get", "put", "post", "delete", "patch"]
OPERATIONS = [(path, m) for path, item in SPEC["paths"].items() for m in METHODS if m in item]
UNKNOWN_ROUTE = "route not found"


def _concrete(path: str) -> str:
    """A documented path with each {param} replaced by an id that exists nowhere."""
    return re.sub(r"\{[^}]+\}", lambda m: "stripe" if m.group(0) == "{vendor}" else "key_00000000000000000000000000", path)


_NODE_TOKENS: dict = {}


def _node_token(kb) -> str:
    """One edge node's token per server, for the `node` security scheme."""
    if kb.control_url not in _NODE_TOKENS:
        r = requests.post(kb.control_url + "/v1/nodes", json={"name": "openapi-node"},
                          headers={"authorization": f"Bearer {kb.admin_token}"}, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 201, r.text
        _NODE_TOKENS[kb.control_url] = r.json()["node_token"]
    return _NODE_TOKENS[kb.control_url]


def _call(kb, tenant_token, path, method, token_kind):
    token = {"admin": kb.admin_token, "tenant": tenant_token, None: None}.get(token_kind) or (
        _node_token(kb) if token_kind == "node" else None)
    headers = {"authorization": f"Bearer {token}", "keybrake-node-session": "openapi-session"} if token else {}
    body = {"name": "openapi"} if method == "post" and path in ("/v1/tenants", "/v1/nodes") else None
    return requests.request(method.upper(), kb.control_url + _concrete(path), headers=headers,
                            json=body, timeout=HTTP_TIMEOUT_S)


def _security(path, method):
    sec = SPEC["paths"][path][method].get("security")
    return next(iter(sec[0])) if sec else None


@pytest.mark.both_backends
def test_every_documented_operation_is_served_with_its_documented_security(keybrake):
    tenant = keybrake.create_tenant("openapi")
    assert OPERATIONS, "the description lists no operations"
    for path, method in OPERATIONS:
        kind = _security(path, method)
        r = _call(keybrake, tenant.token, path, method, kind)
        where = f"{method.upper()} {path} -> {r.status_code} {r.text[:200]}"
        assert r.status_code != 405, where
        if r.status_code == 404:
            assert r.json()["error"]["message"] != UNKNOWN_ROUTE, f"not served: {where}"
        documented = SPEC["paths"][path][method]["responses"]
        assert str(r.status_code) in documented or "default" in documented, f"undocumented status: {where}"
        if r.status_code >= 400 and "default" in documented:
            err = r.json()["error"]
            assert isinstance(err["code"], str) and isinstance(err["message"], str), where
        if kind:
            # Without its token, or with the other kind of token, the call is refused.
            assert _call(keybrake, tenant.token, path, method, None).status_code == 401, where
            other = "tenant" if kind == "admin" else "admin"
            assert _call(keybrake, tenant.token, path, method, other).status_code == 401, where


@pytest.mark.parametrize("path", list(SPEC["paths"]))
def test_methods_not_documented_on_a_path_are_405(keybrake, path):
    item = SPEC["paths"][path]
    for method in METHODS:
        if method in item:
            continue
        r = requests.request(method.upper(), keybrake.control_url + _concrete(path),
                             headers={"authorization": f"Bearer {keybrake.admin_token}"}, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 405, f"{method.upper()} {path} is served but not documented: {r.status_code}"


def test_paths_that_are_not_documented_are_unknown_routes(keybrake):
    for path in ["/v1/key", "/v1/keys/key_x/extra", "/v1/admin", "/v2/keys", "/metrics"]:
        r = requests.get(keybrake.control_url + path, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 404 and r.json()["error"]["message"] == UNKNOWN_ROUTE, (path, r.text)
