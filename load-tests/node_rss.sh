#!/usr/bin/env bash
# RSS of a real edge node holding fleet-scale key state: `keybrake control` (SQLite) and one
# `keybrake proxy` node synced from it, in front of the local nginx upstream (lib.sh).
#
#   1. issue: KEYS (1,000,000) + REVOKED (100,000) distinct vault keys through the control
#      API (wrk, concurrent POST /v1/keys; each answer's id and token written to a file);
#   2. revoke: DELETE /v1/keys/{id} for the REVOKED extra keys (wrk), then wait until the
#      node's revocation filter holds them all (keybrake_revoked_keys), and check that
#      PROBES (1,000) revoked keys are refused by the node: 401 key_revoked;
#   3. proxy: one request per live key THROUGH THE NODE (wrk, each token once):
#      GET /stripe/v1/payment_intents/pi_N, allowed by the key's allowlist
#      ["GET /v1/payment_intents/*"] and NOT metered (a GET moves no money: no lease, no
#      reservation), forwarded to nginx; every answer must be 200 with nginx's
#      PaymentIntent, and the node must have verified each token once
#      (keybrake_token_cache_misses_total grows by exactly KEYS) and hold no more than
#      the cache's bound (keybrake_token_cache_entries, keybrake_token_cache_keys);
#   4. prints the node's VmRSS / VmHWM (/proc/PID/status) at start, after the revocations
#      synced and after the KEYS keys, the node's keybrake_token_cache_* metrics and the
#      time of each phase, and fails when the final VmRSS is at or above LIMIT_MIB (256).
#
# The node keeps every key verified in its verified-token cache (`token_cache_entries`,
# default 1,048,576 digests; keys in use with claims and allowlist: a sixteenth of it) and
# every revoked id until it expires (docs/operations.md, "Memory of a node").
#
#   cargo build --release --bin keybrake
#   load-tests/node_rss.sh                       # ~6 min on the 2-core dev machine (15 at most)
#   KEYS=20000 REVOKED=2000 load-tests/node_rss.sh   # ~20 s
#
# Env knobs: KEYS  REVOKED  PROBES  LIMIT_MIB  CONNS (wrk connections, 16)  WRK_THREADS (1)
# KB_THREADS (node's Pingora threads, 2)  TTL (keys' expires_in, "2h": must outlast the run)
# ACCESS_LOG (the node's and control plane's, "off" here; a path to keep one)
# ISSUE_TIMEOUT / REVOKE_TIMEOUT / PROXY_TIMEOUT (s, 360 / 120 / 360: a phase that takes
# longer fails, so a run ends within ~15 min)
# CACHE_ENTRIES (the node's token_cache_entries, 1048576; e.g. 262144 to see it evict)
# KB_EXTRA_YAML (more config lines)
# PIN / SERVER_CPUS / LOAD_CPUS (lib.sh)  KEEP_TMP (1).
set -euo pipefail
ACCESS_LOG=${ACCESS_LOG:-off}
CACHE_ENTRIES=${CACHE_ENTRIES:-1048576}
KB_EXTRA_YAML="token_cache_entries: $CACHE_ENTRIES${KB_EXTRA_YAML:+
$KB_EXTRA_YAML}"
source "$(dirname "$0")/lib.sh"
KEYS=${KEYS:-1000000}; REVOKED=${REVOKED:-100000}; PROBES=${PROBES:-1000}
LIMIT_MIB=${LIMIT_MIB:-256}; CONNS=${CONNS:-16}; WRK_THREADS=${WRK_THREADS:-1}; TTL=${TTL:-2h}
ISSUE_TIMEOUT=${ISSUE_TIMEOUT:-360}; REVOKE_TIMEOUT=${REVOKE_TIMEOUT:-120}; PROXY_TIMEOUT=${PROXY_TIMEOUT:-360}
[ "$PROBES" -le "$REVOKED" ] || PROBES=$REVOKED
[ "$KEYS" -ge 1 ] && [ "$REVOKED" -ge 0 ] || die "KEYS must be >= 1 and REVOKED >= 0"

need wrk
need curl
need nginx
need_bin "$KB_BIN" "cargo build --release --bin keybrake"

T_START=$(date +%s.%N)
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }
mib() { awk -v f="$2" '$1 == f":" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
RSS_LINES=()
rss_mark() { # LABEL -> remembers the node's VmRSS and VmHWM now
  kill -0 "$KB_NODE_PID" 2>/dev/null || die "the edge node has exited"
  RSS_LINES+=("$(printf '%-34s VmRSS %8s MiB   VmHWM %8s MiB' "$1" "$(mib "$KB_NODE_PID" VmRSS)" "$(mib "$KB_NODE_PID" VmHWM)")")
  echo "  ${RSS_LINES[-1]}"
}
node_metric() { # NAME -> its value on the node (0 when absent)
  curl -fsS --max-time 5 "http://$KB_METRICS/metrics" | awk -v m="$1" '$1 == m {v = $2} END {printf "%d\n", v + 0}'
}

# wrk_until_done PHASE TIMEOUT LUA URL ARGS... -> runs wrk (-d TIMEOUT) in the background;
# each wrk thread writes $TMP/PHASE.done.N once its share is answered (the Lua scripts
# below), and wrk is stopped (SIGINT: it prints its summary) as soon as all have. Fails
# when the phase is not done within TIMEOUT seconds. wrk's output: $TMP/PHASE.wrk.
wrk_until_done() {
  local phase=$1 timeout=$2 lua=$3 url=$4 done_n
  shift 4
  rm -f "$TMP/$phase".done.*
  "${ON_LOAD[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${timeout}s" --timeout 10s -s "$lua" "$url" -- "$@" \
    >"$TMP/$phase.wrk" 2>&1 &
  WRK_PID=$!
  while kill -0 "$WRK_PID" 2>/dev/null; do
    done_n=$(find "$TMP" -maxdepth 1 -name "$phase.done.*" | wc -l)
    [ "$done_n" -ge "$WRK_THREADS" ] && { kill -INT "$WRK_PID" 2>/dev/null || true; break; }
    sleep 0.2
  done
  wait "$WRK_PID" || true
  WRK_PID=
  done_n=$(find "$TMP" -maxdepth 1 -name "$phase.done.*" | wc -l)
  [ "$done_n" -ge "$WRK_THREADS" ] || { cat "$TMP/$phase.wrk" >&2; die "$phase: not done within ${timeout}s"; }
}

# Per-thread Lua prologue: thread N (1-based, `tid`) handles its own share.
LUA_THREADS='
local n_threads = 0
local threads = {}
function setup(thread)
  n_threads = n_threads + 1
  thread:set("tid", n_threads)
  table.insert(threads, thread)
end
-- wrk 4 calls request() once in thread 1 right after init() to check what it returns,
-- and never sends that one: it gets the sentinel, so no id or token is lost.
verifying = true
local function mark_done()
  local f = io.open(dir .. "/" .. phase .. ".done." .. tid, "w")
  f:write("done\n")
  f:close()
  wrk.thread:stop()
end
local function sum(name)
  local s = 0
  for _, t in ipairs(threads) do s = s + (t:get(name) or 0) end
  return s
end
-- Answers a thread did not expect for its phase are counted in `bad`, the first
-- kept in `first_bad` (thread globals, read back by report()).
local function note_bad(status, body)
  bad = bad + 1
  if first_bad == "" then first_bad = status .. " " .. string.sub(body or "", 1, 300) end
end
-- At the end (main state): "LABEL: N" (COUNTED summed over threads), "bad: N", the first bad.
local function report(label, counted)
  io.write(string.format("%s: %d\nbad: %d\n", label, sum(counted), sum("bad")))
  for _, t in ipairs(threads) do
    local f = t:get("first_bad")
    if f and f ~= "" then io.write("first bad: " .. f .. "\n"); return end
  end
end
'

# one_per_line_lua PHASE FILE REQUEST SENTINEL IGNORE OK -> a wrk script (stdout): each
# thread sends one request per line of its share FILE.<tid> (REQUEST: a Lua expression of
# `line` and `sent`), then SENTINEL (a Lua request expression) until every request is
# answered; an answer for which IGNORE holds (a Lua condition on `status` and `body`: the
# sentinel's) is not counted, the others count as ok when OK holds, else as bad. Prints
# "ok: N" and "bad: N" (and the first bad answer) at the end.
one_per_line_lua() {
  cat <<LUA
$LUA_THREADS
function init(args)
  dir = args[1]; phase = "$1"
  lines = io.open(dir .. "/$2." .. tid, "r")
  sent = 0; answered = 0; ok = 0; bad = 0; first_bad = ""; exhausted = false
end
function request()
  if verifying and tid == 1 then verifying = false; return $4 end
  verifying = false
  local line = not exhausted and lines:read("*l")
  if line then
    sent = sent + 1
    return $3
  end
  exhausted = true
  return $4
end
function response(status, headers, body)
  if $5 then return end
  answered = answered + 1
  if $6 then
    ok = ok + 1
  else
    note_bad(status, body)
  end
  if exhausted and answered == sent then mark_done() end
end
function done(summary, latency, requests) report("ok", "ok") end
LUA
}

# ---- set-up ---------------------------------------------------------------------------
NGINX_PORT=$(free_port)
start_nginx "$NGINX_PORT"
start_keybrake_edge "http://127.0.0.1:$NGINX_PORT"
new_tenant
echo "node RSS with $KEYS live keys and $REVOKED revoked ids: keybrake control (SQLite) + one edge node (pid $KB_NODE_PID, $KB_BIN), $PIN_DESC; wrk -t$WRK_THREADS -c$CONNS"
rss_mark "node started (tenant, credential)"
misses0=$(node_metric keybrake_token_cache_misses_total)

# ---- 1. issue KEYS + REVOKED keys -----------------------------------------------------
TOTAL=$((KEYS + REVOKED))
cat >"$TMP/issue.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"label":"rss","vendor":"stripe","allowed_endpoints":["GET /v1/payment_intents/*"],"daily_usd_cap":5,"expires_in":"$TTL"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KB_TENANT_TOKEN"
$LUA_THREADS
function init(args)
  local total, nt = tonumber(args[1]), tonumber(args[3])
  dir = args[2]; phase = "issue"
  quota = math.floor(total / nt) + ((tid <= total % nt) and 1 or 0)
  created = 0; bad = 0; first_bad = ""
  out = io.open(dir .. "/issued." .. tid, "w")
  if quota == 0 then mark_done() end
end
function response(status, headers, body)
  if created >= quota then return end
  local id = status == 201 and body:match('"id"%s*:%s*"(key_[%w]+)"')
  local token = status == 201 and body:match('"token"%s*:%s*"(vk_[^"]+)"')
  if id and token then
    out:write(id, " ", token, "\n")
    created = created + 1
    if created == quota then out:close(); mark_done() end
  else
    note_bad(status, body)
    if bad >= 100 then out:close(); mark_done() end
  end
end
function done(summary, latency, requests) report("issued", "created") end
LUA
echo "1. issuing $TOTAL keys (POST /v1/keys, allowed_endpoints [\"GET /v1/payment_intents/*\"], expires_in $TTL) ..."
t0=$(date +%s.%N)
wrk_until_done issue "$ISSUE_TIMEOUT" "$TMP/issue.lua" "http://$KB_CONTROL/v1/keys" "$TOTAL" "$TMP" "$WRK_THREADS"
T_ISSUE=$(elapsed "$t0")
bad=$(awk '/^bad:/{print $2}' "$TMP/issue.wrk")
[ "${bad:-1}" = 0 ] || { cat "$TMP/issue.wrk" >&2; die "issuance: ${bad:-?} answers were not 201 with an id and a token"; }
cat "$TMP"/issued.* >"$TMP/issued.txt"
rm -f "$TMP"/issued.[0-9]*
n=$(wc -l <"$TMP/issued.txt")
[ "$n" = "$TOTAL" ] || die "issuance: $n keys written, $TOTAL expected"
[ "$(cut -d' ' -f1 "$TMP/issued.txt" | sort -u | wc -l)" = "$TOTAL" ] || die "issuance: key ids are not distinct"
[ "$(cut -d' ' -f2 "$TMP/issued.txt" | sort -u | wc -l)" = "$TOTAL" ] || die "issuance: tokens are not distinct"
head -n "$REVOKED" "$TMP/issued.txt" >"$TMP/revoked.txt"
tail -n "$KEYS" "$TMP/issued.txt" | cut -d' ' -f2 >"$TMP/live.txt"
rm -f "$TMP/issued.txt"
echo "  $TOTAL keys in ${T_ISSUE}s ($(python3 -c "print(round($TOTAL / $T_ISSUE))") keys/s)"
rss_mark "after issuance (node untouched)"

# split FILE -> FILE.1 .. FILE.WRK_THREADS, by lines
split_for_threads() {
  local i
  split -n "l/$WRK_THREADS" -d -a 3 "$1" "$1.part."
  for i in $(seq 1 "$WRK_THREADS"); do mv "$1.part.$(printf '%03d' $((i - 1)))" "$1.$i"; done
}

# ---- 2. revoke REVOKED keys, wait for the node, probe ---------------------------------
T_REVOKE=0; T_SYNC=0
if [ "$REVOKED" -gt 0 ]; then
  cut -d' ' -f1 "$TMP/revoked.txt" >"$TMP/revoke_ids.txt"
  split_for_threads "$TMP/revoke_ids.txt"
  # Once a thread's ids are all sent, its connections send GET /healthz (a sentinel whose
  # answer is not counted) until every DELETE is answered.
  { echo "wrk.headers[\"Authorization\"] = \"Bearer $KB_TENANT_TOKEN\""
    one_per_line_lua revoke revoke_ids.txt 'wrk.format("DELETE", "/v1/keys/" .. line)' \
      'wrk.format("GET", "/healthz")' \
      'status == 200 and body:find("\"status\":\"ok\"", 1, true)' \
      'status == 200 and body:find("\"status\":\"revoked\"", 1, true)'
  } >"$TMP/revoke.lua"
  echo "2. revoking $REVOKED keys (DELETE /v1/keys/{id}) ..."
  t0=$(date +%s.%N)
  wrk_until_done revoke "$REVOKE_TIMEOUT" "$TMP/revoke.lua" "http://$KB_CONTROL" "$TMP"
  T_REVOKE=$(elapsed "$t0")
  r=$(awk '/^ok:/{print $2}' "$TMP/revoke.wrk"); bad=$(awk '/^bad:/{print $2}' "$TMP/revoke.wrk")
  [ "${bad:-1}" = 0 ] && [ "${r:-0}" = "$REVOKED" ] || { cat "$TMP/revoke.wrk" >&2; die "revocation: ${r:-?} revoked, ${bad:-?} other answers"; }
  t1=$(date +%s.%N)
  for _ in $(seq 1 300); do   # at most 30 s after the last DELETE
    [ "$(node_metric keybrake_revoked_keys)" -ge "$REVOKED" ] && break
    sleep 0.1
  done
  held=$(node_metric keybrake_revoked_keys)
  [ "$held" -ge "$REVOKED" ] || die "the node holds $held revoked ids 30 s after the last DELETE, $REVOKED expected"
  T_SYNC=$(elapsed "$t1")
  echo "  $REVOKED revoked in ${T_REVOKE}s; the node held all $held revoked ids ${T_SYNC}s after the last DELETE"
  rss_mark "after the revocations synced"

  head -n "$PROBES" "$TMP/revoked.txt" | cut -d' ' -f2 >"$TMP/probe.txt"
  python3 - "$KB_PROXY" "$TMP/probe.txt" <<'PY' || die "a revoked key was not refused by the node"
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], timeout=10)
n = 0
for token in open(sys.argv[2]).read().split():
    conn.request("GET", "/stripe/v1/payment_intents/pi_revoked", headers={"authorization": f"Bearer {token}"})
    r = conn.getresponse()
    body = r.read()
    code = json.loads(body).get("error", {}).get("code") if body.startswith(b"{") else None
    if r.status != 401 or code != "key_revoked":
        sys.exit(f"revoked key #{n + 1}: HTTP {r.status} {body[:200]!r}, expected 401 key_revoked")
    n += 1
print(f"  {n} revoked keys refused by the node: 401 key_revoked")
PY
fi
rm -f "$TMP/revoked.txt" "$TMP"/probe.txt "$TMP"/revoke_ids.txt*
misses1=$(node_metric keybrake_token_cache_misses_total)

# ---- 3. one request per live key through the node -------------------------------------
split_for_threads "$TMP/live.txt"
rm -f "$TMP/live.txt"
# Once a thread's tokens are all sent, its connections send a request without a key (a
# sentinel: 401 missing_key, not counted) until every keyed request is answered.
one_per_line_lua proxy live.txt \
  'wrk.format("GET", "/stripe/v1/payment_intents/pi_" .. sent, {["Authorization"] = "Bearer " .. line})' \
  'wrk.format("GET", "/stripe/v1/payment_intents/pi_sentinel")' \
  'status == 401 and body:find("\"missing_key\"", 1, true)' \
  'status == 200 and body:find("\"object\":\"payment_intent\"", 1, true)' >"$TMP/proxy.lua"
echo "3. one request per live key through the node ($KEYS x GET /stripe/v1/payment_intents/pi_N, not metered) ..."
t0=$(date +%s.%N)
wrk_until_done proxy "$PROXY_TIMEOUT" "$TMP/proxy.lua" "http://$KB_PROXY" "$TMP"
T_PROXY=$(elapsed "$t0")
ok=$(awk '/^ok:/{print $2}' "$TMP/proxy.wrk"); bad=$(awk '/^bad:/{print $2}' "$TMP/proxy.wrk")
[ "${bad:-1}" = 0 ] && [ "${ok:-0}" = "$KEYS" ] || { cat "$TMP/proxy.wrk" >&2; die "proxy: ${ok:-?} answered 200 with the PaymentIntent, ${bad:-?} other answers"; }
misses2=$(node_metric keybrake_token_cache_misses_total)
[ $((misses2 - misses1)) = "$KEYS" ] || die "the node verified $((misses2 - misses1)) tokens for $KEYS distinct keys"
echo "  $KEYS answered 200 with nginx's PaymentIntent in ${T_PROXY}s ($(python3 -c "print(round($KEYS / $T_PROXY))") req/s); $((misses2 - misses1)) tokens verified by the node (cache misses)"
sleep 2   # one sweep of the cache (every second) and of the metrics gauges
rss_mark "after $KEYS live keys verified"
# The cache's bound (docs/operations.md, "Memory of a node"): digests <= token_cache_entries,
# keys in use <= a sixteenth of it (at least 1,024); digests beyond it were evicted.
entries=$(node_metric keybrake_token_cache_entries); in_use=$(node_metric keybrake_token_cache_keys)
in_use_bound=$((CACHE_ENTRIES / 16 > 1024 ? CACHE_ENTRIES / 16 : 1024))
[ "$entries" -le "$CACHE_ENTRIES" ] || die "the node holds $entries verified digests, above its bound $CACHE_ENTRIES"
[ "$in_use" -le "$in_use_bound" ] || die "the node holds $in_use keys in use, above their bound $in_use_bound"
[ "$entries" -gt 0 ] || die "keybrake_token_cache_entries is 0 after $KEYS keys were verified"
echo "  cache: $entries verified digests (bound $CACHE_ENTRIES; $((misses2 - misses0 - entries)) evicted), $in_use keys in use (bound $in_use_bound)"
rm -f "$TMP"/live.txt.*

# ---- 4. report --------------------------------------------------------------------------
echo
echo "=== SUMMARY (node pid $KB_NODE_PID; limit $LIMIT_MIB MiB)"
printf '%s\n' "${RSS_LINES[@]}"
echo "phases: issue ${T_ISSUE}s, revoke ${T_REVOKE}s (+${T_SYNC}s to the node), proxy ${T_PROXY}s, total $(elapsed "$T_START")s"
echo "node metrics:"
curl -fsS --max-time 5 "http://$KB_METRICS/metrics" | grep -E '^keybrake_(token_cache_|revoked_keys )' | sed 's/^/  /'
rss=$(mib "$KB_NODE_PID" VmRSS)
python3 -c "import sys; r, l = float(sys.argv[1]), float(sys.argv[2]); print(f'node VmRSS {r:.1f} MiB with {sys.argv[3]} live keys verified and {sys.argv[4]} revoked ids (limit {l:.0f} MiB): ' + ('OK' if r < l else 'ABOVE')); sys.exit(r >= l)" \
  "$rss" "$LIMIT_MIB" "$KEYS" "$REVOKED" || exit 1
