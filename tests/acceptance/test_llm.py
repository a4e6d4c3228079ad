"""LLM token metering (SPEC §5, docs/llm-metering.md), end to end.

The real `keybrake serve` in front of fakes/llm_server.py (a fake OpenAI and Anthropic,
JSON and SSE), called by the official `openai` and `anthropic` Python SDKs and the
`openai` npm package. What each test holds to: the answer reaches the client unchanged
(apart from the usage chunk Keybrake asked for on its behalf), the key is charged the
usage × conf/prices.yaml to the micro-dollar, the audit trail says the same, and a key
never ends above its cap — concurrent streams, cut streams and unreadable usage
included. Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Optional

import pytest
import requests

from harness import (
    CONF_DIR,
    HTTP_TIMEOUT_S,
    KEYBRAKE_BIN,
    REPO,
    Keybrake,
    assert_denied,
    free_port,
    read_head,
    wait_until,
    write_config,
)

FAKE_LLM = Path(__file__).resolve().parent / "fakes" / "llm_server.py"
OPENAI_SECRET = "sk-proj-" + secrets.token_hex(20)
ANTHROPIC_SECRET = "sk-ant-api03-" + secrets.token_hex(20)
OVERHEAD_TOKENS = 1024  # src/proxy/llm/request.rs


# --------------------------------------------------------------------------- fake vendor


class FakeLLM:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "FakeLLM":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE_LLM), "--port", str(self.port), "--state-dir", str(self.state_dir)],
            stdout=open(self.state_dir / "stdout.log", "ab"),
            stderr=open(self.state_dir / "stderr.log", "ab"),
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.state_dir / "stderr.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("fake LLM vendor did not start within 15 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def wait_for(self, n: int, timeout: float = 10) -> list[dict]:
        """The log once it has `n` entries (a stream's is written after its last byte)."""
        got = wait_until(lambda: len(self.received()) >= n and self.received(), timeout=timeout)
        assert got and len(got) >= n, f"the fake logged {len(got or [])} requests, expected {n}"
        return got

    def received(self, path: Optional[str] = None) -> list[dict]:
        log = self.state_dir / "requests.jsonl"
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # the last line, still being written
            e["body"] = base64.b64decode(e.pop("body_b64"))
            if path is None or e["path"].split("?")[0] == path:
                out.append(e)
        return out


@pytest.fixture
def fake_llm(tmp_path):
    fake = FakeLLM(tmp_path / "fake-llm").start()
    yield fake
    fake.stop()


@pytest.fixture
def kb(keybrake_factory, fake_llm) -> Keybrake:
    return keybrake_factory({"openai": fake_llm.url, "anthropic": fake_llm.url})


@pytest.fixture
def kb_multi_pass(keybrake_factory, fake_llm, tmp_path) -> Keybrake:
    """A proxy whose operator allows calls the vendor may sample more than once for
    (`llm_multi_pass_tools: allow`), charged after the fact."""
    cfg = write_config(tmp_path / "conf-multi-pass", llm_multi_pass_tools="allow")
    return keybrake_factory({"openai": fake_llm.url, "anthropic": fake_llm.url}, config=cfg)


@pytest.fixture
def tenant(kb):
    t = kb.create_tenant("llm")
    t.put_credential("openai", OPENAI_SECRET)
    t.put_credential("anthropic", ANTHROPIC_SECRET)
    return t


# --------------------------------------------------------------------------- prices


def prices() -> dict:
    """conf/prices.yaml as {vendor: {model: {field: Decimal or int}}} (flow mappings)."""
    table, vendor = {}, None
    for line in (CONF_DIR / "prices.yaml").read_text().splitlines():
        m = re.match(r"^([a-z][\w-]*):\s*$", line)
        if m:
            vendor = table.setdefault(m.group(1), {})
            continue
        m = re.match(r"^\s{4}([\w.-]+):\s*\{(.*)\}\s*$", line)
        if m and vendor is not None:
            entry = {}
            for part in m.group(2).split(","):
                k, v = (x.strip() for x in part.split(":", 1))
                entry[k] = Decimal(v.strip('"')) if v.startswith('"') else int(v)
            entry.setdefault("cached_input", entry["input"])
            entry.setdefault("cache_write", entry["input"])
            entry.setdefault("cache_write_1h", entry["cache_write"])
            entry.setdefault("output", Decimal(0))
            vendor[m.group(1)] = entry
    return table


PRICES = prices()
MICRO = Decimal("0.000001")


def usd(token_prices: list[tuple[int, Decimal]]) -> Decimal:
    """Σ tokens × USD per million, rounded up to the micro-dollar (once, on the sum)."""
    total = sum(Decimal(n) * p for n, p in token_prices) / Decimal(1_000_000)
    return total.quantize(MICRO, rounding=ROUND_CEILING)


def usage_cost(vendor: str, model: str, path: str, usage: dict) -> Decimal:
    """What the fake vendor's reported usage costs, by the vendor's billing rules."""
    p = PRICES[vendor][model]
    if path == "/v1/messages" and usage.get("iterations"):
        # Every sampling pass is billed (a compaction pass, then the message).
        return sum((usage_cost(vendor, model, path, it) for it in usage["iterations"]), Decimal(0))
    if path == "/v1/messages":
        return usd([(usage["input_tokens"], p["input"]),
                    (usage.get("cache_read_input_tokens", 0), p["cached_input"]),
                    (usage.get("cache_creation_input_tokens", 0), p["cache_write"]),
                    (usage["output_tokens"], p["output"])])
    if path == "/v1/responses":
        cached = usage["input_tokens_details"]["cached_tokens"]
        return usd([(usage["input_tokens"] - cached, p["input"]), (cached, p["cached_input"]),
                    (usage["output_tokens"], p["output"])])
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return usd([(usage["prompt_tokens"] - cached, p["input"]), (cached, p["cached_input"]),
                (usage.get("completion_tokens", 0), p["output"])])


def bound(vendor: str, model: str, forwarded_body: bytes, output_tokens: int, embeddings: bool = False) -> Decimal:
    """The reservation of a text-only request (docs/llm-metering.md)."""
    p = PRICES[vendor][model]
    dearest = max(p["input"], p["cached_input"], p["cache_write"], p["cache_write_1h"])
    tokens = len(forwarded_body) + (0 if embeddings else OVERHEAD_TOKENS)
    if "context" in p:
        tokens = min(tokens, p["context"])
    return usd([(tokens, dearest), (output_tokens, p["output"])])


def model_of(entry: dict) -> str:
    return json.loads(entry["body"])["model"]


def family(vendor: str, model: str) -> str:
    if model in PRICES[vendor]:
        return model
    return re.sub(r"-(\d{4}-\d\d-\d\d|\d{8}|latest)$", "", model)


def expected_spend(fake: FakeLLM, vendor: str) -> Decimal:
    total = Decimal(0)
    for e in fake.received():
        if e.get("usage") and e["status"] == 200 and not e.get("cut") and not e.get("aborted"):
            path = e["path"].split("?")[0]
            if (path == "/v1/messages") == (vendor == "anthropic"):
                total += usage_cost(vendor, family(vendor, model_of(e)), path, e["usage"])
    return total


def key(tenant, vendor="openai", cap=5, **kw) -> dict:
    return tenant.issue_key(vendor=vendor, allowed_endpoints=["/v1/**"], daily_usd_cap=cap, **kw)


def test_paid_endpoints_the_proxy_does_not_meter_are_refused_to_a_capped_key(kb, tenant, fake_llm):
    """Images, audio, batches, fine-tuning, legacy completions (OpenAI) and message
    batches, legacy complete (Anthropic) bill money the proxy does not meter: a capped
    key gets 403 endpoint_unmetered and the vendor receives nothing (SPEC §4). Issuing a
    key whose allowlist reaches them warns. Known-free calls still pass."""
    for vendor, paths in (("openai", ["/v1/images/generations", "/v1/audio/speech", "/v1/batches",
                                      "/v1/fine_tuning/jobs", "/v1/completions"]),
                          ("anthropic", ["/v1/messages/batches", "/v1/complete"])):
        r = tenant.call("POST", "/v1/keys", json={"vendor": vendor, "allowed_endpoints": ["/v1/**"],
                                                  "daily_usd_cap": 1})
        assert r.status_code == 201, r.text
        assert r.json().get("warnings"), r.json()
        token = r.json()["token"]
        for path in paths:
            resp = kb.proxy("POST", f"/{vendor}{path}", key=token, json={"model": "x"})
            assert_denied(resp, 403, "endpoint_unmetered")
    assert fake_llm.received() == []
    k = key(tenant, vendor="anthropic")
    r = requests.post(f"{kb.proxy_url}/anthropic/v1/messages/count_tokens", headers={"x-api-key": k["token"]},
                      json={"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]},
                      timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text


def openai_client(kb: Keybrake, token: str):
    import openai

    return openai.OpenAI(api_key=token, base_url=f"{kb.proxy_url}/openai/v1", max_retries=0, timeout=30)


def anthropic_client(kb: Keybrake, token: str):
    import anthropic

    return anthropic.Anthropic(api_key=token, base_url=f"{kb.proxy_url}/anthropic", max_retries=0, timeout=30)


def assert_audit_matches(tenant, key_id: str, expected_total: Decimal, llm_calls: int) -> list[dict]:
    def allowed():
        events = [e for e in tenant.audit_all(key_id=key_id) if e["decision"] == "allowed"]
        return events if len(events) >= llm_calls else None

    events = wait_until(allowed, timeout=10) or tenant.audit_all(key_id=key_id)
    assert len(events) >= llm_calls, events
    # Every row of the key, whatever its decision, adds up to what it was charged.
    every = tenant.audit_all(key_id=key_id)
    assert sum(Decimal(str(e["spend_usd"])) for e in every) == expected_total, every
    return events


# --------------------------------------------------------------------------- tests


def test_openai_python_sdk_json_and_streams_are_settled_from_usage(kb, tenant, fake_llm):
    """Chat (JSON, a stream that did not ask for usage, one that did), Responses (JSON and
    stream) and embeddings through the official SDK: answers as the vendor sent them,
    the vendor saw only its own secret, spend = usage × price = the audit trail."""
    k = key(tenant, cap=5)
    client = openai_client(kb, k["token"])
    messages = [{"role": "user", "content": "Say hello"}]

    done = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=50)
    assert done.choices[0].message.content == "Hello from the fake"
    assert done.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=messages,
                                                 max_completion_tokens=40, stream=True,
                                                 extra_headers={"x-fake-cached": "8", "x-fake-reasoning": "3"}))
    # The usage chunk Keybrake asked for is not passed on; nothing else is missing.
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the fake"
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = fake_llm.wait_for(2)[-1]
    assert sent["asked_usage"] is True
    body = json.loads(sent["body"])
    assert body.pop("stream_options") == {"include_usage": True}
    assert body == {"model": "gpt-4o-mini-2024-07-18", "messages": messages, "max_completion_tokens": 40,
                    "stream": True}

    asked = list(client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=30, stream=True,
                                                stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].choices == []
    assert asked[-1].usage.completion_tokens == fake_llm.wait_for(3)[-1]["usage"]["completion_tokens"]

    r = client.responses.create(model="gpt-4.1-mini", input="Say hello", max_output_tokens=64)
    assert r.output_text == "Hello from the fake"
    events = list(client.responses.create(model="gpt-4.1-mini", input="Say hello", max_output_tokens=64,
                                          stream=True))
    assert [e.type for e in events][-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello from the fake"

    emb = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens > 0

    received = fake_llm.wait_for(6)
    assert len(received) == 6
    assert all(e["headers"]["authorization"] == f"Bearer {OPENAI_SECRET}" for e in received)
    expected = expected_spend(fake_llm, "openai")
    assert expected > 0
    tenant.wait_spent(k["id"], expected)
    events = assert_audit_matches(tenant, k["id"], expected, 6)
    stream_event = [e for e in events if e.get("model") == "gpt-4o-mini-2024-07-18"][0]
    usage = fake_llm.received("/v1/chat/completions")[1]["usage"]
    assert stream_event["input_tokens"] == usage["prompt_tokens"]
    assert stream_event["cached_input_tokens"] == 8
    assert stream_event["output_tokens"] == usage["completion_tokens"]

    metrics = requests.get(f"{kb.metrics_url}/metrics", timeout=10).text
    for kind in ["input", "cached_input", "output", "reasoning"]:
        assert re.search(rf'keybrake_llm_tokens_total{{kind="{kind}",vendor="openai"}} [1-9]', metrics), kind


def test_anthropic_python_sdk_json_and_stream_with_cache_tokens(kb, tenant, fake_llm):
    k = key(tenant, vendor="anthropic", cap=5)
    client = anthropic_client(kb, k["token"])
    messages = [{"role": "user", "content": "Say hello"}]
    m = client.messages.create(model="claude-3-5-haiku-20241022", max_tokens=100, messages=messages,
                               extra_headers={"x-fake-cached": "300", "x-fake-cache-write": "200"})
    assert m.content[0].text == "Hello from the fake"
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the fake"
    assert final.usage.output_tokens == fake_llm.wait_for(2)[-1]["usage"]["output_tokens"]
    # Counting tokens costs nothing.
    counted = client.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)
    assert counted.input_tokens > 0

    # A client that names no anthropic-version gets the catalog's default.
    r = requests.post(f"{kb.proxy_url}/anthropic/v1/messages/count_tokens", headers={"x-api-key": k["token"]},
                      json={"model": "claude-sonnet-4-5", "messages": messages}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    received = fake_llm.wait_for(4)
    assert all(e["headers"]["x-api-key"] == ANTHROPIC_SECRET and "authorization" not in e["headers"]
               for e in received)
    import anthropic

    sdk_version = anthropic.Anthropic(api_key="x").default_headers["anthropic-version"]
    assert [e["headers"]["anthropic-version"] for e in received] == [sdk_version] * 3 + ["2023-06-01"]
    expected = expected_spend(fake_llm, "anthropic")
    tenant.wait_spent(k["id"], expected)
    events = assert_audit_matches(tenant, k["id"], expected, 4)
    cached = [e for e in events if e.get("model") == "claude-3-5-haiku-20241022"][0]
    assert (cached["cached_input_tokens"], cached["cache_write_tokens"]) == (300, 200)
    assert [e["spend_usd"] for e in events if e["path"].endswith("count_tokens")] == [0, 0]


def test_anthropic_compaction_pass_is_charged_with_the_message(kb_multi_pass, fake_llm):
    """A request with `context_management` may run a compaction pass over the whole
    conversation before the message; Anthropic bills both and reports the passes in
    `usage.iterations` (the top level counts the message only). Where the operator allows
    such calls, the key is charged both, JSON and streamed, to the micro-dollar."""
    kb = kb_multi_pass
    tenant = kb.create_tenant("llm")
    tenant.put_credential("anthropic", ANTHROPIC_SECRET)
    k = key(tenant, vendor="anthropic", cap=5)
    client = anthropic_client(kb, k["token"])
    compact = {"context_management": {"edits": [{"type": "compact_20260112"}]}}
    messages = [{"role": "user", "content": "Summarize our long chat"}]
    m = client.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=messages,
                               extra_body=compact, extra_headers={"x-fake-compaction": "150000"})
    assert m.content[0].text == "Hello from the fake"
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=messages,
                                extra_body=compact, extra_headers={"x-fake-compaction": "120000"}) as stream:
        assert "".join(stream.text_stream) == "Hello from the fake"
    received = fake_llm.wait_for(2)
    assert all(len(e["usage"]["iterations"]) == 2 for e in received)
    expected = expected_spend(fake_llm, "anthropic")
    top_level_only = sum((usage_cost("anthropic", "claude-sonnet-4-5", "/v1/messages",
                                     {**e["usage"], "iterations": None}) for e in received), Decimal(0))
    assert expected > 10 * top_level_only  # the compaction passes are most of the bill
    tenant.wait_spent(k["id"], expected)
    assert_audit_matches(tenant, k["id"], expected, 2)


def test_openai_npm_sdk_streams_through_the_proxy(kb, tenant, fake_llm, tmp_path):
    node = shutil.which("node")
    if node is None or not (REPO / "node_modules" / "openai" / "package.json").exists():
        pytest.fail("node and the openai npm package are needed: run `npm install` at the repo root")
    k = key(tenant, cap=5)
    script = tmp_path / "agent.cjs"
    script.write_text(
        "const m = require(process.env.OPENAI_MODULE);\n"
        "const OpenAI = m.OpenAI ?? m.default ?? m;\n"
        "async function main() {\n"
        "  const client = new OpenAI({apiKey: process.env.KEY, baseURL: process.env.BASE, maxRetries: 0});\n"
        "  const done = await client.chat.completions.create({model: 'gpt-4o-mini', max_tokens: 20,\n"
        "    messages: [{role: 'user', content: 'hi'}]});\n"
        "  const stream = await client.chat.completions.create({model: 'gpt-4o-mini', max_tokens: 20,\n"
        "    stream: true, messages: [{role: 'user', content: 'hi'}]});\n"
        "  let text = '', usageSeen = false;\n"
        "  for await (const c of stream) { text += c.choices[0]?.delta?.content ?? ''; usageSeen ||= !!c.usage; }\n"
        "  console.log(JSON.stringify({json: done.choices[0].message.content, stream: text, usageSeen}));\n"
        "}\n"
        "main().catch((e) => { console.error(e); process.exit(1); });\n"
    )
    env = {"PATH": "/usr/bin:/bin", "KEY": k["token"], "BASE": f"{kb.proxy_url}/openai/v1",
           "OPENAI_MODULE": str(REPO / "node_modules" / "openai")}
    out = subprocess.run([node, str(script)], env=env, capture_output=True, timeout=60, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"json": "Hello from the fake", "stream": "Hello from the fake", "usageSeen": False}
    fake_llm.wait_for(2)
    expected = expected_spend(fake_llm, "openai")
    tenant.wait_spent(k["id"], expected)
    assert_audit_matches(tenant, k["id"], expected, 2)


def stream_request(kb: Keybrake, token: str, max_tokens: int, headers: Optional[dict] = None,
                   model: str = "gpt-4o") -> requests.Response:
    return requests.post(
        f"{kb.proxy_url}/openai/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}", **(headers or {})},
        json={"model": model, "max_tokens": max_tokens, "stream": True,
              "messages": [{"role": "user", "content": "Say hello"}]},
        stream=True, timeout=HTTP_TIMEOUT_S,
    )


def test_a_hundred_concurrent_streams_never_take_a_one_dollar_key_past_its_cap(kb, tenant, fake_llm):
    k = key(tenant, cap=1)
    start = threading.Barrier(100)

    def one(_):
        start.wait(timeout=30)
        r = stream_request(kb, k["token"], 2700, {"x-fake-pieces": "10", "x-fake-delay-ms": "200"})
        body = r.content
        return r.status_code, body

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(100)))
    ok = [b for s, b in results if s == 200]
    refused = [b for s, b in results if s != 200]
    for s, b in results:
        if s != 200:
            assert s == 429 and json.loads(b)["code"] == "cap_exhausted", (s, b[:300])
    # Each call reserves ~$0.03 (2,700 output tokens of gpt-4o): about 33 fit at once,
    # and the streams (2 s each) all start before the first one ends.
    per_call = bound("openai", "gpt-4o", fake_llm.wait_for(len(ok))[0]["body"], 2700)
    assert 1 <= len(ok) <= int(1 / per_call) and len(refused) >= 100 - int(1 / per_call), (len(ok), per_call)
    assert all(b.endswith(b"data: [DONE]\n\n") for b in ok)
    expected = expected_spend(fake_llm, "openai")
    assert len(fake_llm.received()) == len(ok)
    key_now = tenant.wait_spent(k["id"], expected)
    assert key_now["spent_today_usd"] <= 1
    # Settled usage freed budget: another call fits now.
    r = stream_request(kb, k["token"], 2700)
    assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")


def test_no_output_limit_reserves_the_models_maximum_and_is_refused_when_it_does_not_fit(kb, tenant, fake_llm):
    k = key(tenant, cap=0.1)
    # gpt-4o writes at most 16,384 tokens at $10/M: $0.164 > $0.10.
    r = kb.proxy("POST", "/openai/v1/chat/completions", k["token"],
                 json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert assert_denied(r, 429, "cap_exhausted")["budget"] == "key"
    assert fake_llm.received() == []
    # gpt-4o-mini's maximum fits ($0.0098): forwarded as is, no limit added.
    r = kb.proxy("POST", "/openai/v1/chat/completions", k["token"],
                 json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert "max_tokens" not in json.loads(fake_llm.wait_for(1)[-1]["body"])
    tenant.wait_spent(k["id"], expected_spend(fake_llm, "openai"))


def test_client_gone_after_the_first_chunk_stops_the_vendor_and_is_charged_the_reservation(kb, tenant, fake_llm):
    k = key(tenant, cap=5)
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 500, "stream": True,
                       "messages": [{"role": "user", "content": "Say hello"}]}).encode()
    s = socket.create_connection(("127.0.0.1", kb.proxy_port), timeout=10)
    s.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {k['token']}\r\nx-fake-pieces: 200\r\nx-fake-delay-ms: 20\r\n".encode()
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    while b"data: " not in first:
        first += s.recv(65536)
    s.close()
    aborted = wait_until(lambda: [e for e in fake_llm.received() if e.get("aborted")], timeout=10)
    assert aborted, f"the vendor kept streaming: {fake_llm.received()}"
    assert aborted[0]["events"] < 150
    reservation = bound("openai", "gpt-4o-mini", aborted[0]["body"], 500)
    tenant.wait_spent(k["id"], reservation)
    event = assert_audit_matches(tenant, k["id"], reservation, 1)[0]
    assert event["model"] == "gpt-4o-mini" and event["output_tokens"] is None
    # Allowed and answered: the client leaving is not a denial of the call.
    assert (event["decision"], event["status"]) == ("allowed", 200), event


def test_vendor_cutting_the_stream_or_sending_unreadable_usage_is_charged_the_reservation(kb, tenant, fake_llm):
    k = key(tenant, cap=5)
    r = stream_request(kb, k["token"], 300, {"x-fake-cut-after": "3"}, model="gpt-4o-mini")
    assert r.status_code == 200
    with pytest.raises(requests.exceptions.RequestException):
        r.content
    cut_body = fake_llm.wait_for(1)[-1]["body"]
    # JSON answers: unreadable usage passes through unchanged, and costs the reservation.
    client = openai_client(kb, k["token"])
    done = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=70, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-usage": "malformed"})
    assert json.loads(done.content)["usage"] == {"prompt_tokens": "lots"}
    malformed_body = fake_llm.wait_for(2)[-1]["body"]
    # Anthropic: cut after message_start (input known, output not).
    ak = key(tenant, vendor="anthropic", cap=5)
    a = anthropic_client(kb, ak["token"])
    with pytest.raises(Exception):
        with a.messages.stream(model="claude-haiku-4-5", max_tokens=80, messages=[{"role": "user", "content": "x"}],
                               extra_headers={"x-fake-cut-after": "4"}) as stream:
            "".join(stream.text_stream)
    anthropic_body = fake_llm.wait_for(3)[-1]["body"]
    expected = bound("openai", "gpt-4o-mini", cut_body, 300) + bound("openai", "gpt-4o-mini", malformed_body, 70)
    tenant.wait_spent(k["id"], expected)
    assert_audit_matches(tenant, k["id"], expected, 2)
    tenant.wait_spent(ak["id"], bound("anthropic", "claude-haiku-4-5", anthropic_body, 80))
    received = fake_llm.received()
    assert received[0].get("cut") and received[2].get("cut"), received
    assert received[1]["usage"] == {"prompt_tokens": "lots"}


def test_an_answer_served_at_a_premium_tier_costs_the_key_its_cap(kb, tenant, fake_llm):
    """A project whose default tier is priority bills a call that names none at about
    twice the table's rates, and only the answer says so (`service_tier`): the proxy
    cannot price it, so the key is charged its whole cap and stops for the day, on
    OpenAI (JSON) and on Anthropic (a stream), instead of being under-counted."""
    k = key(tenant, cap=2)
    client = openai_client(kb, k["token"])
    done = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-service-tier": "priority"})
    assert done.service_tier == "priority"
    tenant.wait_spent(k["id"], Decimal(2))
    r = kb.proxy("POST", "/openai/v1/chat/completions", k["token"],
                 json={"model": "gpt-4o-mini", "max_tokens": 5, "messages": []})
    assert_denied(r, 429, "cap_exhausted")
    ak = key(tenant, vendor="anthropic", cap=3)
    a = anthropic_client(kb, ak["token"])
    with a.messages.stream(model="claude-haiku-4-5", max_tokens=40, messages=[{"role": "user", "content": "x"}],
                           extra_headers={"x-fake-service-tier": "priority"}) as stream:
        "".join(stream.text_stream)
    tenant.wait_spent(ak["id"], Decimal(3))
    # Served at the standard tier, the same calls cost their usage.
    plain = key(tenant, cap=2)
    openai_client(kb, plain["token"]).chat.completions.create(
        model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    usage = fake_llm.received()[-1]["usage"]
    tenant.wait_spent(plain["id"], usage_cost("openai", "gpt-4o-mini", "/v1/chat/completions", usage))


def test_refusals_before_forwarding_and_vendor_errors_cost_nothing(kb, tenant, fake_llm):
    k = key(tenant, cap=5)
    url = "/openai/v1/chat/completions"
    refused = assert_denied(kb.proxy("POST", url, k["token"], json={"model": "gpt-9", "max_tokens": 5}),
                            400, "unknown_model")
    # The message names the model and the vendor, in both places SDKs and agents read it.
    assert refused["message"] == refused["error"]["message"]
    assert refused["message"].startswith('The model "gpt-9" is not in Keybrake\'s price table for openai')
    import anthropic
    import openai

    with pytest.raises(openai.BadRequestError, match='"gpt-9" is not in'):
        openai_client(kb, k["token"]).chat.completions.create(
            model="gpt-9", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert_denied(kb.proxy("POST", url, k["token"], json={"max_tokens": 5, "messages": []}), 400, "invalid_body")
    assert_denied(kb.proxy("POST", url, k["token"], data="model=gpt-4o", headers={"Content-Type": "text/plain"}),
                  400, "invalid_body")
    assert_denied(kb.proxy("POST", url, k["token"], data=b'{"model":"gpt-4o","max_tokens":1,"max_tokens":99999}'),
                  400, "invalid_body")
    a = key(tenant, vendor="anthropic", cap=5)
    with pytest.raises(anthropic.BadRequestError, match='"claude-2.1" is not in .* for anthropic'):
        anthropic_client(kb, a["token"]).messages.create(
            model="claude-2.1", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert fake_llm.received() == []
    # A vendor error is not billed: the reservation goes back.
    r = kb.proxy("POST", url, k["token"], json={"model": "gpt-4o", "max_tokens": 5},
                 headers={"x-fake-status": "400"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "fake error"
    # Unmetered paths pass through at cost_per_request_usd (0).
    assert kb.proxy("GET", "/openai/v1/models", k["token"]).status_code == 200
    tenant.wait_spent(k["id"], Decimal(0))
    want = {"unknown_model", "invalid_body", "allowed"}
    events = wait_until(lambda: (lambda ev: ev if {e["decision"] for e in ev} == want else None)(
        tenant.audit_all(key_id=k["id"])), timeout=5) or tenant.audit_all(key_id=k["id"])
    assert {e["decision"] for e in events} == want, events


def test_calls_whose_cost_the_reservation_cannot_bound_are_refused_or_charged_the_cap(
        kb, tenant, fake_llm, kb_multi_pass):
    """An advisor tool (billed at another model's rates), a hosted shell (a container
    billed per session), Anthropic's premium speed or region, and a background response
    with a tool that loops are refused before anything is sent. So is, by default, any
    call with a tool that has the vendor sample the model more than once (MCP, web fetch,
    tool search, compaction). Where the operator allows those, a streamed one (web fetch
    here) cut before its usage arrives may have cost more than any reservation: it is
    charged the key's whole cap, and the key stops for the day."""
    import anthropic

    ak = key(tenant, vendor="anthropic", cap=5)
    msg = [{"role": "user", "content": "hi"}]
    url = "/anthropic/v1/messages"
    advisor = [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-6"}]
    assert_denied(kb.proxy("POST", url, ak["token"], json={
        "model": "claude-haiku-4-5", "max_tokens": 5, "messages": msg, "tools": advisor}),
        403, "endpoint_unmetered")
    for premium in ({"speed": "fast"}, {"inference_geo": "us"}):
        assert_denied(kb.proxy("POST", url, ak["token"], json={
            "model": "claude-haiku-4-5", "max_tokens": 5, "messages": msg, **premium}),
            400, "invalid_body")
    ok = key(tenant, cap=5)
    responses = "/openai/v1/responses"
    shell = [{"type": "shell", "environment": {"type": "container_auto"}}]
    assert_denied(kb.proxy("POST", responses, ok["token"], json={
        "model": "gpt-4o-mini", "max_output_tokens": 5, "input": "ls", "tools": shell}),
        403, "endpoint_unmetered")
    mcp = [{"type": "mcp", "server_label": "x", "server_url": "https://x.example", "require_approval": "never"}]
    background = {"model": "gpt-4o-mini", "max_output_tokens": 5, "input": "hi", "tools": mcp, "background": True}
    multi_pass = [
        (responses, ok, background),
        (url, ak, {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": msg,
                   "tools": [{"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 3}]}),
        (url, ak, {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": msg,
                   "mcp_servers": [{"type": "url", "url": "https://x.example", "name": "x"}]}),
        (url, ak, {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": msg,
                   "tools": [{"type": "tool_search_tool_regex_20251119", "name": "s"}]}),
        (url, ak, {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": msg,
                   "context_management": {"edits": [{"type": "compact_20260112"}]}}),
        (responses, ok, {"model": "gpt-4o-mini", "max_output_tokens": 5, "input": "hi", "tools": mcp}),
    ]
    for path, k, body in multi_pass:
        denied = assert_denied(kb.proxy("POST", path, k["token"], json=body), 403, "endpoint_unmetered")
        assert "llm_multi_pass_tools: allow" in denied["message"], denied
    assert fake_llm.received() == []

    tenant = kb_multi_pass.create_tenant("llm-multi-pass")
    tenant.put_credential("anthropic", ANTHROPIC_SECRET)
    tenant.put_credential("openai", OPENAI_SECRET)
    # Allowed in the foreground only: a background response is answered before its usage.
    refused = assert_denied(kb_multi_pass.proxy("POST", responses, key(tenant, cap=5)["token"], json=background),
                            403, "endpoint_unmetered")
    assert "background" in refused["message"]
    ak = key(tenant, vendor="anthropic", cap=5)
    a = anthropic_client(kb_multi_pass, ak["token"])
    with pytest.raises(Exception):
        with a.messages.stream(model="claude-haiku-4-5", max_tokens=80, messages=msg,
                               tools=[{"type": "web_fetch_20250910", "name": "web_fetch"}],
                               extra_headers={"x-fake-cut-after": "4"}) as stream:
            "".join(stream.text_stream)
    tenant.wait_spent(ak["id"], Decimal(5))
    with pytest.raises(anthropic.RateLimitError, match="cap"):
        a.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=msg)
    # Only the cut stream reached the vendor; the refused call after it did not.
    assert len(fake_llm.received()) == 1


def test_stored_items_priority_tiers_and_the_1m_beta_are_never_metered_below_their_cost(kb, tenant, fake_llm):
    k = key(tenant, cap=0.01)
    url = "/openai/v1/responses"
    # An item_reference brings a stored item of any size, like previous_response_id: the
    # whole context is reserved (128,000 × $0.15/M = $0.0192 > $0.01), nothing is sent.
    ref = {"model": "gpt-4o-mini", "max_output_tokens": 5,
           "input": [{"type": "item_reference", "id": "msg_1"}, {"role": "user", "content": "go on"}]}
    assert_denied(kb.proxy("POST", url, k["token"], json=ref), 429, "cap_exhausted")
    # A tier billed above the table (priority, or one that may resolve to it).
    for tier in ["priority", "auto", "scale"]:
        body = {"model": "gpt-4o-mini", "max_output_tokens": 5, "input": "hi", "service_tier": tier}
        denied = assert_denied(kb.proxy("POST", url, k["token"], json=body), 400, "invalid_body")
        assert "service_tier" in denied["message"], denied
    chat = {"model": "gpt-4o-mini", "max_tokens": 5, "service_tier": "priority",
            "messages": [{"role": "user", "content": "hi"}]}
    assert_denied(kb.proxy("POST", "/openai/v1/chat/completions", k["token"], json=chat), 400, "invalid_body")
    # Anthropic's 1M-context beta bills input above 200k tokens at higher rates.
    a = key(tenant, vendor="anthropic", cap=5)
    msg = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for beta in ["context-1m-2025-08-07", "prompt-caching-2024-07-31, context-1m-2025-08-07"]:
        denied = assert_denied(kb.proxy("POST", "/anthropic/v1/messages", a["token"], json=msg,
                                        headers={"anthropic-beta": beta}), 400, "invalid_body")
        assert "context-1m" in denied["message"], denied
    assert fake_llm.received() == []
    # What the table prices still goes through.
    ok = {"model": "gpt-4o-mini", "max_output_tokens": 5, "input": "hi", "service_tier": "flex"}
    assert kb.proxy("POST", url, k["token"], json=ok).status_code == 200
    r = kb.proxy("POST", "/anthropic/v1/messages", a["token"], json=msg,
                 headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert r.status_code == 200, r.text
    assert len(fake_llm.wait_for(2)) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_large_prompts_reach_the_vendor_intact(kb, tenant, fake_llm, stream):
    k = key(tenant, cap=5)
    prompt = "".join(secrets.choice("abcdefghij \n\u00e9\u4e2d") for _ in range(300_000))
    body = json.dumps({"model": "gpt-4.1-nano", "max_tokens": 10, "stream": stream,
                       "messages": [{"role": "user", "content": prompt}]}, ensure_ascii=False).encode()
    assert len(body) > 300_000
    r = kb.proxy("POST", "/openai/v1/chat/completions", k["token"], data=body,
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    got = fake_llm.wait_for(1)[-1]["body"]
    if stream:
        assert got == b'{"stream_options":{"include_usage":true},' + body[1:]
        assert b'"usage"' not in r.content and r.content.endswith(b"data: [DONE]\n\n")
    else:
        assert got == body
    tenant.wait_spent(k["id"], expected_spend(fake_llm, "openai"))


def test_stream_chunks_reach_the_client_as_the_vendor_sends_them(kb, tenant, fake_llm):
    k = key(tenant, cap=5)
    t0 = time.monotonic()
    r = stream_request(kb, k["token"], 100, {"x-fake-pieces": "5", "x-fake-delay-ms": "300"}, model="gpt-4o-mini")
    arrivals = []
    for piece in r.iter_content(chunk_size=None):
        if b"data: " in piece:
            arrivals.append(time.monotonic() - t0)
    total = time.monotonic() - t0
    assert total >= 1.8, total
    # The first event arrives long before the last: nothing waits for the whole answer.
    assert arrivals[0] < 0.6, arrivals
    assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] >= 1.2, arrivals


@pytest.mark.parametrize("prices,must_mention", [
    ("openai: {models: {gpt-4o: {input: \"2.5\", output: \"ten\", context: 1, max_output: 1}}}\n"
     "anthropic: {models: {}}\n", ["openai/gpt-4o", "output"]),
    ("openai: {models: {gpt-4o: {input: \"2.5\", output: \"10\"}}}\nanthropic: {models: {}}\n",
     ["openai/gpt-4o", "max_output"]),
    ("openai: {models: {}}\n", ["anthropic", "price table"]),
], ids=["bad-price", "no-bound", "vendor-missing"])
def test_check_refuses_a_bad_price_table_naming_the_entry(tmp_path, prices, must_mention):
    cfg = write_config(tmp_path / "conf")
    (tmp_path / "conf" / "prices.yaml").write_text(prices)
    r = subprocess.run([str(KEYBRAKE_BIN), "check", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=30, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "configuration OK" not in out, out
    for word in must_mention:
        assert word in out, (word, out)
    # The shipped table passes, and is counted.
    shutil.copy(CONF_DIR / "prices.yaml", tmp_path / "conf" / "prices.yaml")
    r = subprocess.run([str(KEYBRAKE_BIN), "check", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=30, cwd=tmp_path)
    assert r.returncode == 0 and re.search(r"\b[1-9]\d* priced models", r.stdout), r.stdout + r.stderr


def test_a_key_that_expires_while_its_body_arrives_sends_nothing(kb, tenant, fake_llm):
    """An LLM call's headers come, then its body only after the key expired (a body may
    take up to body_read_timeout): 401 key_expired, as a new call gets, and the vendor
    receives nothing. A first call leaves the key holding budget, so the reservation
    alone would not refuse it."""
    k = key(tenant, cap=5, expires_in="3s")
    body = json.dumps({"model": "gpt-4o", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    first = kb.proxy("POST", "/openai/v1/chat/completions", k["token"], data=body,
                     headers={"Content-Type": "application/json"})
    assert first.status_code == 200, first.text
    s = socket.create_connection(("127.0.0.1", kb.proxy_port), timeout=15)
    s.sendall((f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {k['token']}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:5])
    time.sleep(4.2)
    assert_denied(kb.proxy("POST", "/openai/v1/chat/completions", k["token"],
                           json={"model": "gpt-4o", "max_tokens": 5}), 401, "key_expired")
    s.sendall(body[5:])
    answer = read_head(s)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]
    time.sleep(0.3)
    assert len(fake_llm.received()) == 1


def test_tools_billed_per_use_are_refused_to_a_capped_key(kb, tenant, fake_llm):
    """Web search, file search, code interpreter/execution and image generation are
    billed per use on top of tokens, in no usage the proxy reads: 403
    endpoint_unmetered, never sent (also a chat's web_search_options and a Responses
    stored prompt, whose tools are out of sight). Function tools pass."""
    k = key(tenant, cap=5)
    a = key(tenant, vendor="anthropic", cap=5)
    refused = [
        (k, "/openai/v1/responses", {"model": "gpt-4o-mini", "max_output_tokens": 5, "input": "news?",
                                     "tools": [{"type": "web_search"}]}),
        (k, "/openai/v1/responses", {"model": "gpt-4o-mini", "max_output_tokens": 5, "input": "plot",
                                     "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}),
        (k, "/openai/v1/responses", {"model": "gpt-4o-mini", "max_output_tokens": 5, "prompt": {"id": "pmpt_1"}}),
        (k, "/openai/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 5, "web_search_options": {},
                                            "messages": [{"role": "user", "content": "news?"}]}),
        (a, "/anthropic/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5,
                                       "messages": [{"role": "user", "content": "news?"}],
                                       "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}),
    ]
    for who, url, body in refused:
        denied = assert_denied(kb.proxy("POST", url, who["token"], json=body), 403, "endpoint_unmetered")
        assert "tool" in denied["message"], denied
    assert fake_llm.received() == []
    ok = {"model": "gpt-4o-mini", "max_output_tokens": 5, "input": "hi",
          "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]}
    r = kb.proxy("POST", "/openai/v1/responses", k["token"], json=ok)
    assert r.status_code == 200, r.text


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_many_cheap_calls_with_large_answers_cannot_hold_the_hosts_memory(kb, tenant, fake_llm):
    """A JSON answer is kept whole to read its usage (up to 32 MiB each). Embeddings are
    nearly free to reserve and their answers are large (hundreds of vectors of thousands
    of floats): 24 such calls at once would have the proxy hold ~24 × 32 MiB for a
    fraction of a cent. What all calls hold together is bounded (256 MiB beyond each
    call's first 64 KiB), one tenant's calls to half of it; a call past that is passed
    on whole and charged its reservation (fail closed), and the key's cap still holds.
    Another tenant's call meanwhile still has room: it is charged its usage."""
    k = key(tenant, cap=1)
    body = {"model": "text-embedding-3-small", "input": [f"text {i}" for i in range(700)]}
    headers = {"Authorization": f"Bearer {k['token']}", "x-fake-dimensions": "3072",
               "x-fake-drip-ms": "100"}
    other = kb.create_tenant("llm-neighbour")
    other.put_credential("openai", OPENAI_SECRET)
    neighbour = key(other, cap=1)
    pid = kb.proc.pid
    before = _status_kib(pid, "VmRSS")

    def embed(_):
        r = requests.post(f"{kb.proxy_url}/openai/v1/embeddings", json=body, headers=headers, timeout=120)
        return r.status_code, len(r.content), len(r.json()["data"])

    with ThreadPoolExecutor(24) as pool:
        flood = pool.map(embed, range(24))
        time.sleep(1.0)  # the flood's answers are arriving (each takes ~2.3 s)
        r = requests.post(f"{kb.proxy_url}/openai/v1/embeddings",
                          json={"model": "text-embedding-3-small", "input": [f"n {i}" for i in range(100)]},
                          headers={**headers, "Authorization": f"Bearer {neighbour['token']}"}, timeout=120)
        assert r.status_code == 200 and len(r.content) > 2**20, (r.status_code, len(r.content))
        answers = list(flood)
    size = answers[0][1]
    assert size > 20 * 2**20, size
    assert answers == [(200, size, 700)] * 24
    peak_growth_mib = (_status_kib(pid, "VmHWM") - before) / 1024
    print(f"24 answers of {size / 2**20:.1f} MiB: the proxy's peak RSS grew {peak_growth_mib:.0f} MiB")
    # Without the bound: ~780 MiB here; with it ~300 (one tenant's half held, the rest
    # in flight).
    assert peak_growth_mib < 450, peak_growth_mib
    got = tenant.get_key(k["id"])
    assert 0 < Decimal(str(got["spent_today_usd"])) <= 1, got

    def embeddings_of(t, key_id):
        return [e for e in t.audit(key_id=key_id) if e["path"].endswith("/embeddings")]

    assert wait_until(lambda: len(embeddings_of(tenant, k["id"])) == 24, timeout=10)
    events = embeddings_of(tenant, k["id"])
    assert any(e["input_tokens"] is None for e in events), events[:3]
    mine = embeddings_of(other, neighbour["id"])
    assert len(mine) == 1 and mine[0]["input_tokens"], mine
