#!/usr/bin/env bash
# Vault-key issuance throughput of `keybrake serve` (embedded SQLite), or with BACKEND=postgres
# of `keybrake control --database-url` on a throwaway PostgreSQL cluster started for the run
# (lib.sh with_postgres; removed afterwards): wrk sends concurrent
#   POST /v1/keys {"label":"load","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],
#                  "daily_usd_cap":5,"expires_in":"5m"}
# with one tenant's API token, for DURATION seconds at CONNS connections, and prints keys/s
# and latency percentiles. Every answer must be 201 (counted by the wrk Lua script);
# afterwards the issued keys must be listed by GET /v1/keys and each wrk-counted key
# must be stored (the listing is walked to count them, bounded by MAX_LIST pages).
#
# Target to compare against (printed, not enforced): >= 5,000 keys/s, p99 < 5 ms on the
# 2-core dev machine for SQLite; >= 3,000 keys/s, p99 < 10 ms for PostgreSQL. One run per concurrency level in CONNS: a moderate one (6), where
# latency is the service's own, and a saturating one (32), where it is mostly queueing.
#
#   cargo build --release --bin keybrake
#   load-tests/key_issuance.sh
#   BACKEND=postgres load-tests/key_issuance.sh
#
# Env knobs: BACKEND (sqlite | postgres)  PG_CPUS (CPUs for PostgreSQL; default keybrake's)  DURATION (s, 10)  CONNS ("6 32", a list)  WARMUP (s, 2)  WRK_THREADS (1)  KB_THREADS (2)
# PIN (1: keybrake and wrk on separate CPUs; 0: no pinning)  SERVER_CPUS / LOAD_CPUS
# COUNT_KEYS (1: page through GET /v1/keys to count stored keys; 0: skip)  KEEP_TMP (1).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
with_postgres "$@"
DURATION=${DURATION:-10}; CONNS=${CONNS:-"6 32"}; WARMUP=${WARMUP:-2}; COUNT_KEYS=${COUNT_KEYS:-1}

need wrk
need curl
need_bin "$KB_BIN" "cargo build --release --bin keybrake"
if [ -n "${KB_DATABASE_URL:-}" ]; then
  TARGET_RPS=3000; TARGET_P99=10; STORE_DESC="PostgreSQL ($(python3 -c 'import sys; u=sys.argv[1]; print(u.split("@")[-1])' "$KB_DATABASE_URL"))"
else
  TARGET_RPS=5000; TARGET_P99=5; STORE_DESC="embedded SQLite"
fi

start_keybrake "http://127.0.0.1:9"   # no proxied traffic here; the upstream is never called
new_tenant

cat >"$TMP/issue.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"label":"load","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],"daily_usd_cap":5,"expires_in":"5m"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KB_TENANT_TOKEN"

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) created = 0; other = 0; first_other = "" end
function response(status, headers, body)
  if status == 201 then
    created = created + 1
  else
    other = other + 1
    if first_other == "" then first_other = status .. " " .. string.sub(body or "", 1, 300) end
  end
end
function done(summary, latency, requests)
  local c, o, f = 0, 0, ""
  for _, t in ipairs(threads) do
    c = c + t:get("created"); o = o + t:get("other")
    if f == "" then f = t:get("first_other") end
  end
  io.write(string.format("status 201: %d\nstatus other: %d\n", c, o))
  if f ~= "" then io.write("first other: " .. f .. "\n") end
end
LUA
URL="http://$KB_CONTROL/v1/keys"

echo "key issuance ($STORE_DESC): POST /v1/keys, ${DURATION}s at each of: $CONNS connections (wrk -t${WRK_THREADS:-1}), $PIN_DESC"
first=${CONNS%% *}
echo "  warming up (${WARMUP}s) ..."
run_wrk "$TMP/warm.txt" "$KB_PID" "$first" "$WARMUP" "$TMP/issue.lua" "$URL"
w201=$(awk '/^status 201:/{print $3}' "$TMP/warm.txt")
wother=$(awk '/^status other:/{print $3}' "$TMP/warm.txt")
c201=0; other=0; sockerr=0; slack=$((first * 2))
echo
echo "=== SUMMARY (targets: >= $TARGET_RPS keys/s and p99 < $TARGET_P99 ms, in the same run)"
printf "%-12s %8s %8s %8s %9s %9s %9s  %s\n" connections keys/s "p50 ms" "p99 ms" "CPU" "other" "non-201" "vs target"
for c in $CONNS; do
  f="$TMP/issue.$c.txt"
  run_wrk "$f" "$KB_PID" "$c" "$DURATION" "$TMP/issue.lua" "$URL"
  read -r rps p50 p99 bad errs reqs < <(wrk_stats "$f")
  n201=$(awk '/^status 201:/{print $3}' "$f"); nother=$(awk '/^status other:/{print $3}' "$f")
  n201=${n201:-0}; nother=${nother:-1}
  c201=$((c201 + n201)); other=$((other + nother)); sockerr=$((sockerr + errs)); slack=$((slack + c * 2))
  verdict=$(python3 -c "import sys; r, p, tr, tp = map(float, sys.argv[1:5]); print('throughput', 'MET' if r >= tr else 'NOT met', '/ p99', 'MET' if p < tp else 'NOT met')" "$rps" "$p99" "$TARGET_RPS" "$TARGET_P99")
  printf "%-12s %8s %8s %8s %8s%% %8s%% %9s  %s\n" "$c" "$rps" "$p50" "$p99" "$(cat "$f.cpu")" "$(cat "$f.other")" "$((nother + errs))" "$verdict"
done
if [ -n "${KB_DATABASE_URL:-}" ]; then
  echo "(CPU: keybrake, 1 core = 100%; other: anything else on keybrake's CPUs — here mostly the PostgreSQL backends, which share them)"
else
  echo "(CPU: keybrake, 1 core = 100%; other: anything else on keybrake's CPUs, > 15% = disturbed run)"
  # The WAL must stay bounded under writes that never pause (checkpoints run beside them).
  wal_bytes=$(stat -c %s "$TMP/data/keybrake.db-wal" 2>/dev/null || echo 0)
  echo "WAL file after the runs: $((wal_bytes / 1024)) KiB (database $(( $(stat -c %s "$TMP/data/keybrake.db") / 1024 )) KiB)"
fi

fail=0
if [ "$sockerr" != 0 ]; then
  echo "FAIL: $sockerr socket errors (connect/read/write/timeout) during the measured runs" >&2
  fail=1
fi
if [ "$other" != 0 ] || [ "$wother" != 0 ]; then
  echo "FAIL: $((other + wother)) responses were not 201; first: $(grep -h '^first other:' "$TMP"/warm.txt "$TMP"/issue.*.txt | head -1)" >&2
  fail=1
fi

# Every key counted as 201 by wrk must be stored and listed (up to 2x the connections more may have
# been issued by requests still in flight when wrk stopped).
if [ "$COUNT_KEYS" = 1 ]; then
  python3 - "$KB_CONTROL" "$KB_TENANT_TOKEN" "$((w201 + c201))" "$slack" "${MAX_LIST:-5000}" <<'PY' || fail=1
import json, sys, urllib.request, urllib.parse
base, token, expected, slack, max_pages = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows, cursor, pages, ids = 0, None, 0, set()
while pages < max_pages:
    q = {"status": "active", "limit": "100"}
    if cursor:
        q["cursor"] = cursor
    req = urllib.request.Request(f"http://{base}/v1/keys?" + urllib.parse.urlencode(q),
                                 headers={"authorization": f"Bearer {token}"})
    page = json.load(urllib.request.urlopen(req, timeout=30))
    pages += 1
    for k in page["data"]:
        ids.add(k["id"])
        rows += 1
    cursor = page.get("next_cursor")
    if not cursor:
        break
n = len(ids)
print(f"stored active keys listed: {n:,} ({pages} pages); 201s counted by wrk: {expected:,}")
if rows != n:
    print(f"FAIL: the listing repeated {rows - n} keys across pages", file=sys.stderr)
    sys.exit(1)
if cursor:
    print(f"(stopped after {max_pages} pages)")
elif not (expected <= n <= expected + slack):
    print(f"FAIL: GET /v1/keys lists {n} active keys, expected {expected}..{expected + slack}", file=sys.stderr)
    sys.exit(1)
PY
fi
exit "$fail"
