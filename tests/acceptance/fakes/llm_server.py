"""A fake OpenAI and Anthropic API on 127.0.0.1 for the acceptance suite.

    python llm_server.py --port 8430 --state-dir /tmp/x

Answers the metered endpoints the way the vendors do, JSON or server-sent events:

* OpenAI `POST /v1/chat/completions` (chunks of `chat.completion.chunk`, the final usage
  chunk only with `stream_options.include_usage`, when every other chunk carries
  `"usage": null`, then `data: [DONE]`), `POST /v1/responses` (`response.created`, text
  deltas, `response.completed` with the usage), `POST /v1/embeddings` (floats or base64);
* Anthropic `POST /v1/messages` (`message_start` with the input usage, content block
  events, `message_delta` with the output usage, `message_stop`) and
  `POST /v1/messages/count_tokens`; any other path answers a small JSON object.

Each event is written (and flushed) as its own chunk, `x-fake-delay-ms` apart (default
5), so a stream arrives piece by piece. Token counts are deterministic: input tokens are
the body's bytes // 8, output tokens two per content piece, never more than the
request's output limit. Request headers steer the fake:

    x-fake-pieces: N         content pieces (default 4)
    x-fake-delay-ms: D       pause between events
    x-fake-cut-after: N      close the connection after N events, mid-stream
    x-fake-usage: malformed  report a usage that cannot be read
    x-fake-status: S         answer S with an error body instead
    x-fake-cached: N         cached input tokens (OpenAI) / cache reads (Anthropic)
    x-fake-cache-write: N    Anthropic cache writes (5-minute TTL)
    x-fake-reasoning: N      OpenAI reasoning tokens (part of the output)
    x-fake-compaction: N     Anthropic: a compaction pass of N input tokens (N // 40 out)
    x-fake-service-tier: T   the tier the answer says served it (default: OpenAI's
                             `default`, Anthropic's `standard`)
                             ran before the message; usage lists both in `iterations`
    x-fake-dimensions: N     embeddings: N floats per vector (default 3)
    x-fake-drip-ms: D        a JSON answer is written 1 MiB at a time, D ms apart

Every request is appended to STATE_DIR/requests.jsonl: method, path, headers, body
bytes, status, the usage the fake reported (`usage`, in the vendor's own shape), the
events it wrote, and whether the client went away mid-stream (`aborted`).
"""

import argparse
import asyncio
import base64
import json
import os
import struct
import time

from aiohttp import web

WORDS = ["Hello", " from", " the", " fake", " vendor", ",", " one", " piece", " at", " a", " time", "."]


def text_pieces(n):
    return [WORDS[i % len(WORDS)] for i in range(n)]


class Call:
    """One request's parameters, read from its body and the x-fake-* headers."""

    def __init__(self, request, body):
        self.request = request
        self.raw = body
        try:
            self.json = json.loads(body) if body else {}
        except ValueError:
            self.json = {}
        if not isinstance(self.json, dict):
            self.json = {}
        h = request.headers
        self.pieces = int(h.get("x-fake-pieces", "4"))
        self.delay = int(h.get("x-fake-delay-ms", "5")) / 1000.0
        self.cut_after = int(h["x-fake-cut-after"]) if "x-fake-cut-after" in h else None
        self.malformed = h.get("x-fake-usage") == "malformed"
        self.status = int(h.get("x-fake-status", "200"))
        self.cached = int(h.get("x-fake-cached", "0"))
        self.cache_write = int(h.get("x-fake-cache-write", "0"))
        self.reasoning = int(h.get("x-fake-reasoning", "0"))
        self.compaction = int(h.get("x-fake-compaction", "0"))
        self.service_tier = h.get("x-fake-service-tier")
        self.dimensions = int(h.get("x-fake-dimensions", "3"))
        self.drip = int(h["x-fake-drip-ms"]) / 1000.0 if "x-fake-drip-ms" in h else None
        self.model = self.json.get("model") or "unknown"
        self.stream = self.json.get("stream") is True

    def output_limit(self, *names):
        limits = [self.json[n] for n in names if isinstance(self.json.get(n), int)]
        return min(limits) if limits else None

    def output_tokens(self, limit):
        tokens = 2 * self.pieces + self.reasoning
        return tokens if limit is None else min(tokens, limit)

    def input_tokens(self):
        return max(1, len(self.raw) // 8)


def record(state_dir, entry):
    with open(os.path.join(state_dir, "requests.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


async def sse(request, call, events, log):
    """Writes `events` (bytes each) one chunk at a time; notes a cut or a client gone."""
    resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream; charset=utf-8",
                                                    "x-request-id": "req_fake"})
    await resp.prepare(request)
    written = 0
    try:
        for event in events:
            if call.cut_after is not None and written >= call.cut_after:
                log["cut"] = True
                request.transport.close()
                return resp
            if written:
                await asyncio.sleep(call.delay)
            await resp.write(event)
            written += 1
            log["events"] = written
        await resp.write_eof()
    except (ConnectionError, RuntimeError, asyncio.CancelledError):
        # A client that stops reading after the last event (as SDKs do on `[DONE]`) got
        # everything; one gone before it did not.
        if written < len(events):
            log["aborted"] = True
            raise
    return resp


def data(obj):
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def named(event, obj):
    return b"event: " + event.encode() + b"\n" + data(obj)


def error_answer(call, log, anthropic=False):
    log["status"] = call.status
    if anthropic:
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": "fake error"}}
    else:
        body = {"error": {"message": "fake error", "type": "invalid_request_error", "code": None}}
    return web.json_response(body, status=call.status)


def openai_chat(call, log):
    limit = call.output_limit("max_tokens", "max_completion_tokens")
    prompt = call.input_tokens()
    completion = call.output_tokens(limit)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(call.cached, prompt), "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": call.reasoning, "audio_tokens": 0},
    }
    if call.malformed:
        usage = {"prompt_tokens": "lots"}
    log["usage"] = usage
    created = int(time.time())
    tier = call.service_tier or "default"
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": call.model,
            "service_tier": tier, "system_fingerprint": "fp_fake"}
    pieces = text_pieces(call.pieces)
    log["text"] = "".join(pieces)
    if not call.stream:
        return None, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": created, "model": call.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": usage, "service_tier": tier, "system_fingerprint": "fp_fake",
        }
    options = call.json.get("stream_options") or {}
    with_usage = options.get("include_usage") is True
    log["asked_usage"] = with_usage
    extra = {"usage": None} if with_usage else {}
    events = [data({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], **extra})]
    for p in pieces:
        events.append(data({**base, "choices": [{"index": 0, "delta": {"content": p}, "logprobs": None,
                                                 "finish_reason": None}], **extra}))
    events.append(data({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                        **extra}))
    if with_usage:
        events.append(data({**base, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events, None


def openai_responses(call, log):
    limit = call.output_limit("max_output_tokens")
    inp = call.input_tokens()
    out = call.output_tokens(limit)
    usage = {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": min(call.cached, inp)},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": call.reasoning},
        "total_tokens": inp + out,
    }
    if call.malformed:
        usage = {"input_tokens": -1}
    log["usage"] = usage
    pieces = text_pieces(call.pieces)
    text = "".join(pieces)
    log["text"] = text
    created = int(time.time())
    message = {"id": "msg_fake", "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    done = {"id": "resp_fake", "object": "response", "created_at": created, "status": "completed",
            "model": call.model, "output": [message], "usage": usage, "error": None,
            "incomplete_details": None, "instructions": None, "metadata": {}, "parallel_tool_calls": True,
            "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "service_tier": call.service_tier or "default"}
    if not call.stream:
        return None, done
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    events = [named("response.created", {"type": "response.created", "sequence_number": 0, "response": started})]
    for i, p in enumerate(pieces):
        events.append(named("response.output_text.delta", {
            "type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_fake",
            "output_index": 0, "content_index": 0, "delta": p}))
    events.append(named("response.completed", {"type": "response.completed", "sequence_number": len(pieces) + 1,
                                               "response": done}))
    return events, None


def openai_embeddings(call, log):
    inputs = call.json.get("input")
    if not isinstance(inputs, list):
        inputs = [inputs]
    tokens = call.input_tokens()
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    if call.malformed:
        usage = None
    log["usage"] = usage
    vec = [(0.25, -0.5, 0.125)[i % 3] - i * 1e-7 for i in range(call.dimensions)]
    as_b64 = call.json.get("encoding_format") == "base64"
    data_ = []
    for i, _ in enumerate(inputs):
        emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_b64 else vec
        data_.append({"object": "embedding", "index": i, "embedding": emb})
    return None, {"object": "list", "data": data_, "model": call.model, "usage": usage}


def anthropic_messages(call, log):
    limit = call.output_limit("max_tokens")
    inp = call.input_tokens()
    out = call.output_tokens(limit)
    # As the API answers: cache writes broken down by lifetime (all 5-minute here), and
    # the tier that served the request.
    usage = {"input_tokens": inp, "cache_creation_input_tokens": call.cache_write,
             "cache_read_input_tokens": call.cached, "output_tokens": out,
             "cache_creation": {"ephemeral_5m_input_tokens": call.cache_write, "ephemeral_1h_input_tokens": 0},
             "service_tier": call.service_tier or "standard"}
    if call.compaction:
        # The top level counts the message's pass only (Anthropic's compaction docs).
        usage["iterations"] = [
            {"type": "compaction", "input_tokens": call.compaction, "output_tokens": call.compaction // 40},
            {"type": "message", "input_tokens": inp, "output_tokens": out},
        ]
    if call.malformed:
        usage = {"input_tokens": inp, "output_tokens": "many"}
    log["usage"] = usage
    pieces = text_pieces(call.pieces)
    text = "".join(pieces)
    log["text"] = text
    message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": call.model,
               "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": usage}
    if not call.stream:
        return None, message
    start_usage = {**usage, "output_tokens": 1} if not call.malformed else usage
    start_usage.pop("iterations", None)
    final_usage = {"output_tokens": usage["output_tokens"]}
    if "iterations" in usage:
        final_usage["iterations"] = usage["iterations"]
    events = [named("message_start", {"type": "message_start", "message": {
        **message, "content": [], "stop_reason": None, "usage": start_usage}}),
        named("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
        named("ping", {"type": "ping"})]
    for p in pieces:
        events.append(named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": p}}))
    events.append(named("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(named("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                          "usage": final_usage}))
    events.append(named("message_stop", {"type": "message_stop"}))
    return events, None


ROUTES = {
    "/v1/chat/completions": (openai_chat, False),
    "/v1/responses": (openai_responses, False),
    "/v1/embeddings": (openai_embeddings, False),
    "/v1/messages": (anthropic_messages, True),
}


# Answers written with x-fake-drip-ms, by request: built once.
DRIPPED = {}


def make_app(state_dir):
    async def handle(request):
        body = await request.read()
        call = Call(request, body)
        log = {"ts": time.time(), "method": request.method, "path": request.raw_path,
               "headers": {k.lower(): v for k, v in request.headers.items()},
               "body_b64": base64.b64encode(body).decode("ascii"), "status": 200, "stream": call.stream}
        try:
            route = ROUTES.get(request.path) if request.method == "POST" else None
            if request.path == "/v1/messages/count_tokens" and request.method == "POST":
                return web.json_response({"input_tokens": call.input_tokens()})
            if route is None:
                return web.json_response({"object": "list", "data": [], "path": request.path})
            handler, anthropic = route
            if call.status != 200:
                return error_answer(call, log, anthropic)
            events, doc = handler(call, log)
            if events is None:
                if call.cut_after is not None:
                    # Headers and half the body, then the connection closes.
                    raw = json.dumps(doc).encode()
                    resp = web.StreamResponse(status=200, headers={"content-type": "application/json",
                                                                    "content-length": str(len(raw))})
                    await resp.prepare(request)
                    await resp.write(raw[: len(raw) // 2])
                    log["cut"] = True
                    request.transport.close()
                    return resp
                if call.drip is not None:
                    # The same request answered again reuses its text (large answers).
                    cached = (request.path, body, call.dimensions)
                    raw = DRIPPED.get(cached) or DRIPPED.setdefault(cached, json.dumps(doc).encode())
                    resp = web.StreamResponse(status=200, headers={"content-type": "application/json",
                                                                    "content-length": str(len(raw)),
                                                                    "x-request-id": "req_fake"})
                    await resp.prepare(request)
                    for at in range(0, len(raw), 1 << 20):
                        if at:
                            await asyncio.sleep(call.drip)
                        await resp.write(raw[at:at + (1 << 20)])
                    await resp.write_eof()
                    return resp
                return web.json_response(doc, headers={"x-request-id": "req_fake", "request-id": "req_fake"})
            return await sse(request, call, events, log)
        finally:
            record(state_dir, log)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    os.makedirs(args.state_dir, exist_ok=True)
    web.run_app(make_app(args.state_dir), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
