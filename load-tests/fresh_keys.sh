#!/usr/bin/env bash
# Fresh keys against one hot key, same process, same run: the metered Stripe call
# (POST /stripe/v1/payment_intents, form body `amount=100&currency=usd`, $1 reserved) sent
# by wrk to `keybrake serve` in front of nginx, once with every request carrying a vault
# key never seen before (signature check, allowlist compile, first budget lease: the
# agents' real workload, one key per invocation) and once with one key for every request.
#
# The fresh keys are issued through the control API (POST /v1/keys, the way agents get
# them) before the timed phase, written to a file by the issuing wrk script, and handed
# out one per request by the measuring script; a key is never sent twice (the script
# fails if it ran out of keys: raise KEYS). Both phases build their requests the same
# way in wrk's Lua, so the load generator costs the same in both.
#
# Prints requests/s, p50, p99 and the proxy's CPU per request for each phase, the
# throughput ratio fresh/hot (target >= 0.5) and how many fresh keys' signatures were
# checked together (batches of fresh keys arriving at once, `src/token/batch.rs`). Fails on any non-2xx answer. Afterwards the
# key's and the fresh keys' settled spend is checked against what wrk counted.
#
#   cargo build --release --bin keybrake
#   load-tests/fresh_keys.sh
#
# KB_MODE=edge runs the same against an edge node (`keybrake proxy`) synced from a
# `keybrake control` (both on the server CPUs): every fresh key's first lease and every
# reservation's write-ahead are control-plane calls there, so the node's metrics are read
# before and after the fresh phases to show how many keys shared one call (batching), and
# the control plane's CPU per request of each phase is printed (what a fleet's fresh keys
# cost it, beside what its hot keys do).
#
# Env knobs: DURATION (s per measured run, 8)  ROUNDS (2; phases alternate hot, fresh;
# medians)  CONNS (32)  KEYS (fresh keys to issue, 150000)  WARMUP (s, 2)  WRK_THREADS (1)
# FRESH_WARMUP (s of fresh keys before the first measured fresh phase; WARMUP): 2 s measures
# the caches still filling (every key new memory: on this VM, memory touched for the first
# time costs ~5 ms per MiB); ~8 s at ~10k keys/s fills the in-use key tier (65,536 keys by
# default) so the measured phase sees the steady state a long-running proxy is in
# KB_THREADS (2)  PIN (1: keybrake on its own CPU)  SERVER_CPUS / LOAD_CPUS  KEEP_TMP (1)
# KB_MODE (serve | edge)  CONTROL_CPUS (edge: the control plane's CPUs; default the server's)  PERF (a path prefix: `perf record -g` of the server CPUs (of the
# proxy when not pinned) during each measured phase (PERF_FREQ samples/s, 499), written to PREFIX.PHASE.ROUND; read
# with `perf report -i …`; in edge mode that includes the control plane).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-8}; ROUNDS=${ROUNDS:-2}; CONNS=${CONNS:-32}; KEYS=${KEYS:-150000}; WARMUP=${WARMUP:-2}
FRESH_WARMUP=${FRESH_WARMUP:-$WARMUP}

start_by_mode
KEY_BODY='{"label":"fresh","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],"daily_usd_cap":5,"expires_in":"1h"}'
control POST /v1/keys "$KB_TENANT_TOKEN" \
  '{"label":"hot","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],"daily_usd_cap":1000000000,"expires_in":"1h"}' \
  >"$TMP/hot.json"
HOT=$(json_field token <"$TMP/hot.json"); HOT_ID=$(json_field id <"$TMP/hot.json")

# -- issue the fresh keys ------------------------------------------------------------------
# wrk issues keys (each 201's token appended to a file) until KEYS are there, then is
# stopped (at most ISSUE_MAX_SECONDS, 300).
cat >"$TMP/issue.lua" <<LUA
wrk.method = "POST"
wrk.body = '$KEY_BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KB_TENANT_TOKEN"
local out
function init(args) out = io.open("$TMP/tokens.txt", "a"); out:setvbuf("line") end
function response(status, headers, body)
  local t = status == 201 and string.match(body, '"token"%s*:%s*"([^"]+)"')
  if t then out:write(t, "\n") else io.stderr:write("issuing: ", status, " ", body, "\n") end
end
LUA
echo "fresh keys vs one hot key: POST /stripe/v1/payment_intents (metered), keybrake ${KB_MODE:-serve}, $PIN_DESC${CONTROL_CPUS:+, control plane on CPU $CONTROL_CPUS}"
echo "  issuing $KEYS keys through POST /v1/keys ..."
: >"$TMP/tokens.txt"
t0=$(date +%s.%N)
"${ON_LOAD[@]}" wrk -t1 -c16 -d"${ISSUE_MAX_SECONDS:-300}s" --timeout 10s -s "$TMP/issue.lua" \
  "http://$KB_CONTROL/v1/keys" >"$TMP/issue.txt" 2>&1 &
WRK_PID=$!
while kill -0 "$WRK_PID" 2>/dev/null && [ "$(wc -l <"$TMP/tokens.txt")" -lt "$KEYS" ]; do sleep 0.2; done
kill -TERM "$WRK_PID" 2>/dev/null || true; wait "$WRK_PID" 2>/dev/null || true; WRK_PID=
t1=$(date +%s.%N)
grep -q '^issuing:' "$TMP/issue.txt" && die "a key was not issued: $(grep -m1 '^issuing:' "$TMP/issue.txt")"
have=$(wc -l <"$TMP/tokens.txt")
[ "$have" -ge "$KEYS" ] || die "only $have of $KEYS keys were issued: $(tail -5 "$TMP/issue.txt")"
python3 -c "import sys; print(f'  {int(sys.argv[1]):,} keys in {float(sys.argv[3]) - float(sys.argv[2]):.1f} s')" "$have" "$t0" "$t1"

# -- the measuring script ------------------------------------------------------------------
# MODE=hot: the hot key every time. MODE=fresh: the next unused token of the file, each
# wrk thread its own stride; `reused` counts requests sent after the keys ran out.
write_measure_lua() { # file mode first-token-index
  cat >"$1" <<LUA
-- i and reused are globals: done() reads them with thread:get.
local mode, first, tokens, stride = "$2", $3, {}, 1
local threads, counter = {}, 0
i, reused = 0, 0
function setup(thread)
  thread:set("tid", counter); counter = counter + 1; table.insert(threads, thread)
end
function init(args)
  stride = $((${WRK_THREADS:-1}))
  i = first + tid
  if mode == "fresh" then
    for line in io.lines("$TMP/tokens.txt") do tokens[#tokens + 1] = line end
  end
end
local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }
function request()
  local t = "$HOT"
  if mode == "fresh" then
    i = i + stride
    t = tokens[i]
    if t == nil then reused = reused + 1; t = tokens[#tokens] end
  end
  headers["Authorization"] = "Bearer " .. t
  return wrk.format("POST", nil, headers, "amount=100&currency=usd")
end
function done(summary, latency, requests)
  local r, last = 0, 0
  for _, t in ipairs(threads) do r = r + t:get("reused"); last = math.max(last, t:get("i")) end
  io.write(string.format("reused keys: %d\nlast index: %d\n", r, last))
end
LUA
}

URL="http://$KB_PROXY/stripe/v1/payment_intents"
next_key=0
printf "\n%-6s %-6s %11s %8s %8s %8s %9s %10s %12s\n" phase round "requests/s" "p50 ms" "p99 ms" "non-2xx" "sock-err" "server CPU" "CPU us/req"
: >"$TMP/results.tsv"
hot_sent=0; fresh_sent=0
measure() { # phase round seconds [quiet]
  local f="$TMP/$1.$2.txt" rps p50 p99 bad errs reqs reused last
  write_measure_lua "$TMP/$1.lua" "$1" "$next_key"
  local perf_pid=
  if [ -n "${PERF:-}" ] && [ -z "${4:-}" ]; then
    local what=(-p "$KB_PID"); [ -n "$SERVER_CPUS" ] && what=(-C "$SERVER_CPUS")
    perf record -q -F "${PERF_FREQ:-499}" -g "${what[@]}" -o "$PERF.$1.$2" >/dev/null 2>&1 & perf_pid=$!
  fi
  run_wrk "$f" "$KB_PID" "$CONNS" "$3" "$TMP/$1.lua" "$URL"
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
  read -r rps p50 p99 bad errs reqs < <(wrk_stats "$f")
  reused=$(awk '/^reused keys:/{print $3}' "$f"); last=$(awk '/^last index:/{print $3}' "$f")
  if [ "$1" = fresh ]; then
    next_key=$last; fresh_sent=$((fresh_sent + reqs))
    [ "${reused:-1}" = 0 ] || die "the fresh phase ran out of keys ($reused requests reused one): raise KEYS above $KEYS"
  else
    hot_sent=$((hot_sent + reqs))
  fi
  if [ "$bad" != 0 ] || [ "$errs" != 0 ]; then
    die "$1: $bad non-2xx responses and $errs socket errors out of $reqs ($f)"
  fi
  [ -n "${4:-}" ] && return
  local us; us=$(python3 -c "import sys; print(f'{float(sys.argv[1]) * 1e4 / max(float(sys.argv[2]), 1):.1f}')" "$(cat "$f.cpu")" "$rps")
  printf "%-6s %-6s %11s %8s %8s %8s %9s %9s%% %12s\n" "$1" "$2" "$rps" "$p50" "$p99" "$bad" "$errs" "$(cat "$f.cpu")" "$us"
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$1" "$2" "$rps" "$p50" "$p99" "$(cat "$f.cpu")" "$(cat "$f.other")" >>"$TMP/results.tsv"
}
measure hot 0 "$WARMUP" quiet
measure fresh 0 "$FRESH_WARMUP" quiet
calls_fresh=0; leases_fresh=0; commits_fresh=0; commit_calls_fresh=0; sent_fresh_measured=0
misses_fresh=0; batches_fresh=0
# edge: the control plane's CPU during the measured phases (its share of each request)
control_ticks() { if [ "${KB_MODE:-serve}" = edge ]; then cpu_ticks "$KB_CONTROL_PID"; else echo 0; fi; }
ctl_hot=0; ctl_fresh=0
for r in $(seq 1 "$ROUNDS"); do
  k0=$(control_ticks)
  measure hot "$r" "$DURATION"
  ctl_hot=$((ctl_hot + $(control_ticks) - k0))
  m0=$(metric keybrake_token_cache_misses_total); b0=$(metric keybrake_token_signature_batches_total)
  if [ "${KB_MODE:-serve}" = edge ]; then
    l0=$(metric keybrake_lease_requests_total); c0=$(metric keybrake_lease_calls_total)
    w0=$(metric keybrake_commit_rows_total); wc0=$(metric keybrake_commit_calls_total); s0=$fresh_sent
  fi
  k0=$(control_ticks)
  measure fresh "$r" "$DURATION"
  ctl_fresh=$((ctl_fresh + $(control_ticks) - k0))
  misses_fresh=$(python3 -c "print(int($misses_fresh + $(metric keybrake_token_cache_misses_total) - $m0))")
  batches_fresh=$(python3 -c "print(int($batches_fresh + $(metric keybrake_token_signature_batches_total) - $b0))")
  if [ "${KB_MODE:-serve}" = edge ]; then
    leases_fresh=$(python3 -c "print(int($leases_fresh + $(metric keybrake_lease_requests_total) - $l0))")
    calls_fresh=$(python3 -c "print(int($calls_fresh + $(metric keybrake_lease_calls_total) - $c0))")
    commits_fresh=$(python3 -c "print(int($commits_fresh + $(metric keybrake_commit_rows_total) - $w0))")
    commit_calls_fresh=$(python3 -c "print(int($commit_calls_fresh + $(metric keybrake_commit_calls_total) - $wc0))")
    sent_fresh_measured=$((sent_fresh_measured + fresh_sent - s0))
  fi
done
if [ "${KB_MODE:-serve}" = edge ]; then
  python3 - "$sent_fresh_measured" "$leases_fresh" "$calls_fresh" "$commits_fresh" "$commit_calls_fresh" \
    "$ctl_hot" "$ctl_fresh" "$CLK_TCK" "$TMP/results.tsv" "$DURATION" <<'PY'
import sys
sent, leases, calls, rows, ccalls, ctl_hot, ctl_fresh, tck = map(int, sys.argv[1:9])
print(f"\nedge node, measured fresh phases: {sent:,} requests (each a new key) -> {leases:,} lease requests "
      f"in {calls:,} control-plane calls ({leases / max(calls, 1):.1f} keys per call), "
      f"{rows:,} write-ahead rows in {ccalls:,} calls ({rows / max(ccalls, 1):.1f} per call)")
# Requests per phase from wrk's rate over the measured seconds.
done = {"hot": 0.0, "fresh": 0.0}
for line in open(sys.argv[9]):
    f = line.split("\t")
    if f[1] != "0":
        done[f[0]] += float(f[2]) * float(sys.argv[10])
us = lambda ticks, n: ticks / tck * 1e6 / max(n, 1)
print(f"control plane CPU per request (its audit, commits, leases, reports): hot {us(ctl_hot, done['hot']):.1f} us, "
      f"fresh {us(ctl_fresh, done['fresh']):.1f} us")
PY
fi
python3 -c "import sys; m, b = int(sys.argv[1]), int(sys.argv[2]); print(f'\nmeasured fresh phases: {m:,} signatures checked in {b:,} checks ({m / max(b, 1):.1f} per check)')" "$misses_fresh" "$batches_fresh"

python3 - "$TMP/results.tsv" "$CONNS" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
def med(phase, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == phase)
hot, fresh = med("hot", 2), med("fresh", 2)
cpu = lambda p: statistics.median(float(r[5]) * 1e4 / float(r[2]) for r in rows if r[0] == p)
print(f"\n=== SUMMARY ({sys.argv[2]} connections; medians over rounds)")
print(f"{'':24}{'hot key':>12}{'fresh keys':>12}")
print(f"{'requests/s':24}{hot:>12,.0f}{fresh:>12,.0f}")
print(f"{'p50 latency ms':24}{med('hot', 3):>12.3f}{med('fresh', 3):>12.3f}")
print(f"{'p99 latency ms':24}{med('hot', 4):>12.3f}{med('fresh', 4):>12.3f}")
print(f"{'server CPU us/request':24}{cpu('hot'):>12.1f}{cpu('fresh'):>12.1f}")
print(f"throughput ratio fresh/hot: {fresh / hot:.3f} (target >= 0.5: {'MET' if fresh / hot >= 0.5 else 'NOT met'})")
disturbed = [f"{r[0]} {r[1]}" for r in rows if float(r[6]) > 15]
if disturbed:
    print(f"WARNING: other processes used > 15% of the server's CPUs during: {', '.join(disturbed)}")
PY

# -- spend after the load: each request reserved $1 ---------------------------------------
sleep 4   # idle leases (return_idle_after, 2 s) go back, spend is reported (every second)
control GET "/v1/keys/$HOT_ID" "$KB_TENANT_TOKEN" >"$TMP/hot_after.json"
python3 - "$TMP/hot_after.json" "$hot_sent" "$(( (ROUNDS + 1) * CONNS ))" <<'PY' || die "the hot key's spend does not match the requests sent"
import json, sys
k = json.load(open(sys.argv[1]))
sent, slack = int(sys.argv[2]), int(sys.argv[3])
settled = k["spent_today_usd"] - (k.get("held_usd") or 0)
ok = sent <= settled <= sent + slack
print(f"\nhot key: settled ${settled:,.2f} for {sent:,} requests counted by wrk (+ up to {slack} in flight): "
      f"{'consistent' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
PY
