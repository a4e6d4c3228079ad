// Deno Deploy agent function: charge a customer through Keybrake with a vault key
// scoped to this one invocation. The Keybrake tenant API token (KEYBRAKE_TOKEN) is the
// only secret in the environment; the Stripe secret never leaves Keybrake.
//
// Run locally (no remote imports, nothing to download):
//
//   KEYBRAKE_API_URL=http://127.0.0.1:8081 KEYBRAKE_PROXY_URL=http://127.0.0.1:8080 \
//   KEYBRAKE_TOKEN=kb_… deno serve --host 127.0.0.1 --port 8000 \
//     --allow-net=127.0.0.1 \
//     --allow-env=KEYBRAKE_API_URL,KEYBRAKE_PROXY_URL,KEYBRAKE_TOKEN,DAILY_USD_CAP \
//     examples/deno/charge.ts
//
//   curl -s http://127.0.0.1:8000 -H 'content-type: application/json' \
//        -d '{"customerId":"cus_…","amountCents":4200}'
//
// On Deno Deploy, set the same variables as environment secrets (the URLs are your
// Keybrake control API and proxy) and deploy this file as the entry point.
//
// Environment:
//   KEYBRAKE_TOKEN      tenant API token (kb_…), required
//   KEYBRAKE_API_URL    control API base URL (default http://127.0.0.1:8081)
//   KEYBRAKE_PROXY_URL  proxy base URL (default http://127.0.0.1:8080)
//   DAILY_USD_CAP       spend cap of each invocation's vault key in USD (default 500)
//
// Response: Stripe's PaymentIntent JSON with Stripe's status; 402
// {"error":"spend_cap_exceeded"} when the payment would exceed the key's cap. Every
// response after the key was issued carries its id in `x-keybrake-key-id`; the key is
// revoked before the response is returned.

const KEYBRAKE_API_URL = baseUrl("KEYBRAKE_API_URL", "http://127.0.0.1:8081");
const KEYBRAKE_PROXY_URL = baseUrl("KEYBRAKE_PROXY_URL", "http://127.0.0.1:8080");
const KEYBRAKE_TOKEN = Deno.env.get("KEYBRAKE_TOKEN") ?? "";
const DAILY_USD_CAP = Number(Deno.env.get("DAILY_USD_CAP") ?? "500");

if (!KEYBRAKE_TOKEN) {
  throw new Error("KEYBRAKE_TOKEN is not set: give this function its Keybrake tenant API token (kb_…)");
}
if (!(DAILY_USD_CAP > 0)) {
  throw new Error(`DAILY_USD_CAP must be a positive number of USD, got ${Deno.env.get("DAILY_USD_CAP")}`);
}

function baseUrl(name: string, fallback: string): string {
  return (Deno.env.get(name) || fallback).replace(/\/+$/, "");
}

function json(body: unknown, status: number, headers: HeadersInit = {}): Response {
  const h = new Headers(headers);
  h.set("content-type", "application/json");
  return new Response(JSON.stringify(body), { status, headers: h });
}

export async function handler(req: Request): Promise<Response> {
  if (req.method !== "POST") {
    return json({ error: "method_not_allowed" }, 405, { allow: "POST" });
  }
  let customerId: unknown, amountCents: unknown;
  try {
    ({ customerId, amountCents } = await req.json());
  } catch {
    return json({ error: "invalid_json" }, 400);
  }
  if (typeof customerId !== "string" || !Number.isInteger(amountCents) || (amountCents as number) <= 0) {
    return json({ error: "invalid_request", message: "expected {customerId: string, amountCents: positive integer}" }, 400);
  }

  // Step 1: Issue a vault key scoped to this invocation.
  // KEYBRAKE_TOKEN is the Keybrake API token — not the Stripe secret.
  const keyRes = await fetch(`${KEYBRAKE_API_URL}/v1/keys`, {
    method: "POST",
    headers: {
      "Authorization": `Bearer ${KEYBRAKE_TOKEN}`,
      "Content-Type": "application/json",
    },
    body: JSON.stringify({
      label: `deno-charge-${req.headers.get("x-request-id") ?? crypto.randomUUID()}`,
      vendor: "stripe",
      allowed_endpoints: ["/v1/payment_intents", "/v1/payment_intents/*"],
      daily_usd_cap: DAILY_USD_CAP, // this invocation can charge at most this much
      expires_in: "5m", // auto-expire after 5 minutes
    }),
  });
  if (!keyRes.ok) {
    console.error(`key issuance failed: ${keyRes.status} ${await keyRes.text()}`);
    return json({ error: "key_issuance_failed" }, 500);
  }
  const { token: vaultKey, id: keyId } = await keyRes.json();
  const keyHeader = { "x-keybrake-key-id": keyId };

  try {
    // Step 2: Call Stripe through the Keybrake proxy with the vault key.
    const stripeRes = await fetch(`${KEYBRAKE_PROXY_URL}/stripe/v1/payment_intents`, {
      method: "POST",
      headers: {
        "Authorization": `Bearer ${vaultKey}`, // vault key, not the Stripe secret
        "Content-Type": "application/json", // Keybrake form-encodes it for Stripe
      },
      body: JSON.stringify({
        amount: amountCents,
        currency: "usd",
        customer: customerId,
        confirm: true,
        automatic_payment_methods: { enabled: true },
      }),
    });
    const text = await stripeRes.text(); // read once: it is needed as JSON either way
    let payment: unknown;
    try {
      payment = JSON.parse(text);
    } catch {
      payment = { error: "upstream_not_json", status: stripeRes.status, body: text.slice(0, 500) };
    }

    if (stripeRes.status === 429 && (payment as { code?: string }).code === "cap_exhausted") {
      return json({ error: "spend_cap_exceeded" }, 402, keyHeader);
    }
    return json(payment, stripeRes.status, keyHeader);
  } finally {
    // Step 3: Revoke the vault key right after use — don't wait for the TTL.
    try {
      const revoked = await fetch(`${KEYBRAKE_API_URL}/v1/keys/${encodeURIComponent(keyId)}`, {
        method: "DELETE",
        headers: { "Authorization": `Bearer ${KEYBRAKE_TOKEN}` },
      });
      await revoked.body?.cancel();
      if (!revoked.ok) console.error(`revoking ${keyId} failed: ${revoked.status} (it expires in 5 minutes anyway)`);
    } catch (e) {
      console.error(`revoking ${keyId} failed: ${e} (it expires in 5 minutes anyway)`);
    }
  }
}

export default { fetch: handler } satisfies Deno.ServeDefaultExport;
