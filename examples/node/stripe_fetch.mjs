#!/usr/bin/env node
// A Node agent using the official `stripe` npm SDK through Keybrake.
//
// The SDK has no base-path option (only host, port and protocol), so it is given a
// fetch-based HTTP client whose fetch rewrites each URL onto the proxy: the proxy's
// origin plus `/stripe` (plus any path prefix in KEYBRAKE_PROXY_URL) before Stripe's
// `/v1/…` path. Everything else is the stock SDK, with a vault key as its API key.
//
//   npm install stripe
//   export KEYBRAKE_TOKEN=kb_…                          # tenant API token
//   export KEYBRAKE_API_URL=http://127.0.0.1:8081       # control API (default)
//   export KEYBRAKE_PROXY_URL=http://127.0.0.1:8080     # proxy (default)
//   node examples/node/stripe_fetch.mjs --customer cus_… --amount-cents 4200 \
//        [--payment-method pm_card_visa] [--cap-usd 500]
//
// Per run: issue a vault key, create a PaymentIntent, confirm it, revoke the key.
// Prints one JSON object. Exit status: 0 paid; 2 the key's daily cap would be exceeded
// (Keybrake's 429 cap_exhausted, a StripeRateLimitError carrying Keybrake's message);
// 1 any other failure.

import { randomUUID } from "node:crypto";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import Stripe from "stripe";

const API_URL = (process.env.KEYBRAKE_API_URL || "http://127.0.0.1:8081").replace(/\/+$/, "");
const PROXY_URL = new URL(process.env.KEYBRAKE_PROXY_URL || "http://127.0.0.1:8080");
const TOKEN = process.env.KEYBRAKE_TOKEN;

/** A Stripe client that sends every call to `${proxy}/stripe/v1/…` with the vault key. */
export function stripeThroughKeybrake(vaultKey, proxyUrl = PROXY_URL, vendor = "stripe") {
  const prefix = `${proxyUrl.pathname.replace(/\/+$/, "")}/${vendor}`;
  const proxyFetch = (url, init) => {
    const u = new URL(url); // http(s)://host:port/v1/… as built by the SDK
    return fetch(`${proxyUrl.origin}${prefix}${u.pathname}${u.search}`, init);
  };
  const protocol = proxyUrl.protocol.replace(":", "");
  return new Stripe(vaultKey, {
    httpClient: Stripe.createFetchHttpClient(proxyFetch),
    host: proxyUrl.hostname,
    port: proxyUrl.port || (protocol === "https" ? 443 : 80),
    protocol,
    maxNetworkRetries: 0,
  });
}

async function keybrake(method, path, body) {
  const res = await fetch(`${API_URL}${path}`, {
    method,
    headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path} failed: ${res.status} ${text.slice(0, 500)}`);
  return JSON.parse(text);
}

async function main() {
  const { values } = parseArgs({
    options: {
      customer: { type: "string" },
      "amount-cents": { type: "string" },
      "payment-method": { type: "string", default: "pm_card_visa" },
      "cap-usd": { type: "string", default: "500" },
    },
  });
  const amount = Number(values["amount-cents"]);
  if (!TOKEN) throw new Error("KEYBRAKE_TOKEN (the Keybrake tenant API token, kb_…) is not set");
  if (!Number.isInteger(amount) || amount <= 0) throw new Error("--amount-cents must be a positive integer");

  const key = await keybrake("POST", "/v1/keys", {
    label: `node-agent-${randomUUID()}`,
    vendor: "stripe",
    // Creation, retrieval, and the confirm step (one segment deeper than `/*`).
    allowed_endpoints: ["/v1/payment_intents", "/v1/payment_intents/*", "POST /v1/payment_intents/*/confirm"],
    daily_usd_cap: Number(values["cap-usd"]),
    expires_in: "5m",
  });
  const out = { key_id: key.id };
  try {
    const stripe = stripeThroughKeybrake(key.token);
    const params = {
      amount,
      currency: "usd",
      payment_method: values["payment-method"],
      automatic_payment_methods: { enabled: true, allow_redirects: "never" },
    };
    if (values.customer) params.customer = values.customer;
    const created = await stripe.paymentIntents.create(params);
    const confirmed = await stripe.paymentIntents.confirm(created.id);
    out.payment_intent = {
      id: confirmed.id,
      status: confirmed.status,
      amount: confirmed.amount,
      created_status: created.status,
    };
    return [0, out];
  } catch (err) {
    if (!(err instanceof Stripe.errors.StripeError)) throw err;
    const capped = err.statusCode === 429 && err.code === "cap_exhausted";
    Object.assign(out, {
      error: capped ? "spend_cap_exceeded" : "stripe_error",
      message: err.message,
      stripe_error: { type: err.type, http_status: err.statusCode, code: err.code ?? null },
    });
    return [capped ? 2 : 1, out];
  } finally {
    await keybrake("DELETE", `/v1/keys/${encodeURIComponent(key.id)}`).catch((e) =>
      console.error(`revoking ${key.id} failed: ${e.message} (it expires anyway)`)
    );
  }
}

const isMain = process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href;
if (isMain) {
  main().then(
    ([code, out]) => {
      console.log(JSON.stringify(out));
      if (code === 2) console.error(`spend cap exceeded: ${out.message}`);
      process.exitCode = code;
    },
    (e) => {
      console.log(JSON.stringify({ error: "failed", message: String(e?.message ?? e) }));
      process.exitCode = 1;
    },
  );
}
