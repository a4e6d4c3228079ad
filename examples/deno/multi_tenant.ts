// Multi-tenant Deno Deploy agent function: each tenant's Stripe account is registered
// in Keybrake under its own Keybrake tenant, so each tenant has its own Keybrake API
// token. Per invocation, look up the tenant's token, issue a vault key for that tenant
// (its own daily cap), charge through the proxy, revoke. A vault key issued for tenant
// A's Stripe account cannot be used against tenant B's: Keybrake injects the secret of
// the tenant that issued the key.
//
// Where the tenant tokens live (looked up per request, never in code):
//   * Deno KV, when the runtime has it (Deno Deploy; locally `--unstable-kv`):
//       ["tenants", tenantId, "keybrake_token"]  → "kb_…"
//       ["tenants", tenantId, "daily_usd_cap"]   → number (optional)
//   * else, or when KV has no entry, the KEYBRAKE_TENANTS environment variable, a JSON map:
//       {"acme": {"token": "kb_…", "daily_usd_cap": 200}, "globex": {"token": "kb_…"}}
//
// Run locally:
//
//   KEYBRAKE_TENANTS='{"acme":{"token":"kb_…","daily_usd_cap":200}}' \
//   KEYBRAKE_API_URL=http://127.0.0.1:8081 KEYBRAKE_PROXY_URL=http://127.0.0.1:8080 \
//   deno serve --host 127.0.0.1 --port 8000 --allow-net=127.0.0.1 \
//     --allow-env=KEYBRAKE_API_URL,KEYBRAKE_PROXY_URL,KEYBRAKE_TENANTS,DAILY_USD_CAP \
//     examples/deno/multi_tenant.ts
//
//   curl -s http://127.0.0.1:8000 -H 'content-type: application/json' \
//        -d '{"tenantId":"acme","customerId":"cus_…","amountCents":4200}'
//
// In a real deployment the tenant id comes from your own authentication (a session, a
// signed job payload), not from a field the caller can choose freely.

const KEYBRAKE_API_URL = (Deno.env.get("KEYBRAKE_API_URL") || "http://127.0.0.1:8081").replace(/\/+$/, "");
const KEYBRAKE_PROXY_URL = (Deno.env.get("KEYBRAKE_PROXY_URL") || "http://127.0.0.1:8080").replace(/\/+$/, "");
const DEFAULT_DAILY_USD_CAP = Number(Deno.env.get("DAILY_USD_CAP") ?? "500");

interface TenantConfig {
  token: string;
  daily_usd_cap?: number;
}

// ---------------------------------------------------------------- tenant directory

// Deno KV only exists with --unstable-kv (or on Deno Deploy); reach it structurally so
// this file type-checks and runs either way.
interface KvLike {
  get(key: unknown[]): Promise<{ value: unknown }>;
}
type OpenKv = () => Promise<KvLike>;
let kvPromise: Promise<KvLike | null> | undefined;

function openKv(): Promise<KvLike | null> {
  if (kvPromise === undefined) {
    const open = (Deno as unknown as { openKv?: OpenKv }).openKv;
    kvPromise = typeof open === "function"
      ? open().catch((e) => {
        console.error(`Deno KV unavailable (${e}); tenants come from KEYBRAKE_TENANTS only`);
        return null;
      })
      : Promise.resolve(null);
  }
  return kvPromise;
}

const envTenants: Record<string, TenantConfig> = (() => {
  const raw = Deno.env.get("KEYBRAKE_TENANTS");
  if (!raw) return {};
  const parsed = JSON.parse(raw);
  if (typeof parsed !== "object" || parsed === null) throw new Error("KEYBRAKE_TENANTS must be a JSON object");
  return parsed as Record<string, TenantConfig>;
})();

async function lookupTenant(tenantId: string): Promise<TenantConfig | null> {
  const kv = await openKv();
  if (kv) {
    const token = (await kv.get(["tenants", tenantId, "keybrake_token"])).value;
    if (typeof token === "string" && token) {
      const cap = (await kv.get(["tenants", tenantId, "daily_usd_cap"])).value;
      return { token, daily_usd_cap: typeof cap === "number" ? cap : undefined };
    }
  }
  const t = Object.hasOwn(envTenants, tenantId) ? envTenants[tenantId] : undefined;
  return t && typeof t.token === "string" && t.token ? t : null;
}

// ---------------------------------------------------------------- Keybrake client

interface VaultKey {
  id: string;
  token: string;
}

interface IssueOptions {
  vendor: string;
  allowed_endpoints: string[];
  daily_usd_cap: number;
  expires_in: string;
  label: string;
}

async function issueVaultKey(tenantToken: string, options: IssueOptions): Promise<VaultKey> {
  const res = await fetch(`${KEYBRAKE_API_URL}/v1/keys`, {
    method: "POST",
    headers: { "Authorization": `Bearer ${tenantToken}`, "Content-Type": "application/json" },
    body: JSON.stringify(options),
  });
  if (!res.ok) throw new Error(`key issuance failed: ${res.status} ${await res.text()}`);
  const { id, token } = await res.json();
  return { id, token };
}

async function revokeVaultKey(tenantToken: string, keyId: string): Promise<void> {
  try {
    const res = await fetch(`${KEYBRAKE_API_URL}/v1/keys/${encodeURIComponent(keyId)}`, {
      method: "DELETE",
      headers: { "Authorization": `Bearer ${tenantToken}` },
    });
    await res.body?.cancel();
    if (!res.ok) console.error(`revoking ${keyId} failed: ${res.status} (it expires anyway)`);
  } catch (e) {
    console.error(`revoking ${keyId} failed: ${e} (it expires anyway)`);
  }
}

// ---------------------------------------------------------------- handler

function json(body: unknown, status: number, headers: HeadersInit = {}): Response {
  const h = new Headers(headers);
  h.set("content-type", "application/json");
  return new Response(JSON.stringify(body), { status, headers: h });
}

export async function handler(req: Request): Promise<Response> {
  if (req.method !== "POST") return json({ error: "method_not_allowed" }, 405, { allow: "POST" });
  let tenantId: unknown, customerId: unknown, amountCents: unknown;
  try {
    ({ tenantId, customerId, amountCents } = await req.json());
  } catch {
    return json({ error: "invalid_json" }, 400);
  }
  if (
    typeof tenantId !== "string" || typeof customerId !== "string" ||
    !Number.isInteger(amountCents) || (amountCents as number) <= 0
  ) {
    return json({
      error: "invalid_request",
      message: "expected {tenantId: string, customerId: string, amountCents: positive integer}",
    }, 400);
  }

  // Look up the tenant's Keybrake token (KV or KEYBRAKE_TENANTS), never a Stripe secret.
  const tenant = await lookupTenant(tenantId);
  if (!tenant) return json({ error: "unknown_tenant" }, 404);

  const runId = req.headers.get("x-request-id") ?? crypto.randomUUID();
  let vaultKey: VaultKey;
  try {
    vaultKey = await issueVaultKey(tenant.token, {
      vendor: "stripe",
      allowed_endpoints: ["/v1/payment_intents", "/v1/payment_intents/*"],
      daily_usd_cap: tenant.daily_usd_cap ?? DEFAULT_DAILY_USD_CAP,
      expires_in: "10m",
      label: `tenant-${tenantId}-run-${runId}`,
    });
  } catch (e) {
    console.error(String(e));
    return json({ error: "key_issuance_failed" }, 500);
  }
  const keyHeader = { "x-keybrake-key-id": vaultKey.id };

  try {
    const stripeRes = await fetch(`${KEYBRAKE_PROXY_URL}/stripe/v1/payment_intents`, {
      method: "POST",
      headers: { "Authorization": `Bearer ${vaultKey.token}`, "Content-Type": "application/json" },
      body: JSON.stringify({
        amount: amountCents,
        currency: "usd",
        customer: customerId,
        confirm: true,
        automatic_payment_methods: { enabled: true },
        metadata: { tenant_id: tenantId, run_id: runId },
      }),
    });
    const text = await stripeRes.text();
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
    await revokeVaultKey(tenant.token, vaultKey.id);
  }
}

export default { fetch: handler } satisfies Deno.ServeDefaultExport;
