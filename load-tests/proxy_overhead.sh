#!/usr/bin/env bash
# Keybrake vs a bare Pingora passthrough: same machine, same run, same local upstream.
#
# The request is an allowed, metered Stripe call — POST /v1/payment_intents with the form
# body `amount=100&currency=usd` and `Authorization: Bearer <vault key>` — sent by wrk to
#   keybrake:    http://<proxy>/stripe/v1/payment_intents   (vault-key check, endpoint
#                match, body read + amount reserved, credential swap, audit, access log)
#   passthrough: http://<passthrough>/v1/payment_intents    (examples/passthrough.rs:
#                Pingora forwarding everything unchanged, nothing else)
# Both forward to the same nginx answering a fixed PaymentIntent JSON with 200.
#
# Prints requests/s and p50/p99 latency per run, then the throughput ratio
# keybrake/passthrough (and the same ratio from server CPU time per request, steadier on
# a VM whose speed drifts) and the added p99, at saturation (CONNS connections), at the same
# paced load for both (PACED_CONNS connections, each pausing a random 0..2*PACED_DELAY_MS
# ms between its requests: about a third of the passthrough's capacity, so the added p99 is Keybrake's
# own latency, not queueing behind a lower throughput) and under light load (LIGHT_CONNS
# connections). Fails if keybrake answers anything but 2xx.
#
#   cargo build --release --bin keybrake --example passthrough
#   load-tests/proxy_overhead.sh
#
# Env knobs: DURATION (s per measured run, 10)  CONNS (32)  ROUNDS (3; runs alternate
# passthrough, keybrake; the summary takes medians)  WARMUP (s per target, 3)  LIGHT_CONNS (1; 0 skips the light-load
# runs)  LIGHT_DURATION (5)  PACED_CONNS (16; 0 skips the paced runs)  PACED_DELAY_MS (4)
# PACED_DURATION (10)  WRK_THREADS (1)  KB_THREADS (Pingora threads of both proxies,
# 2)  PIN (1: pin server vs wrk+upstream to separate CPUs; 0: no pinning)  SERVER_CPUS /
# LOAD_CPUS (taskset lists)  UPSTREAM (nginx | fixed_upstream = examples/fixed_upstream.rs)
# ACCESS_LOG (keybrake access log; default a file in the temp dir, "off" to disable)
# KEEP_TMP (1 keeps the temp dir with every wrk output and the keybrake logs)
# PT_TIMEOUTS (1: the passthrough sets Keybrake's default upstream timeouts, so the timers
# they cost are in both; the issue's baseline is the bare passthrough, the default 0).
# KB_MODE (serve: `keybrake serve`, the default; edge: `keybrake control` plus one edge node
# `keybrake proxy` synced from it, the request sent to the node; load-tests/edge_vs_serve.sh
# alternates the two).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-10}; CONNS=${CONNS:-32}; ROUNDS=${ROUNDS:-3}; WARMUP=${WARMUP:-3}
LIGHT_CONNS=${LIGHT_CONNS:-1}; LIGHT_DURATION=${LIGHT_DURATION:-5};
PACED_CONNS=${PACED_CONNS:-16}; PACED_DELAY_MS=${PACED_DELAY_MS:-4}; PACED_DURATION=${PACED_DURATION:-10}; UPSTREAM=${UPSTREAM:-nginx}
PT_BIN="$KB_ROOT/target/release/examples/passthrough"

need wrk
need curl
need_bin "$KB_BIN" "cargo build --release --bin keybrake"
need_bin "$PT_BIN" "cargo build --release --example passthrough"

# -- upstream, passthrough, keybrake --------------------------------------------------
up=$(free_port); pt=$(free_port)
case "$UPSTREAM" in
  nginx) start_nginx "$up" ;;
  fixed_upstream)
    need_bin "$KB_ROOT/target/release/examples/fixed_upstream" "cargo build --release --example fixed_upstream"
    "${ON_LOAD[@]}" "$KB_ROOT/target/release/examples/fixed_upstream" --listen "127.0.0.1:$up" \
      >"$TMP/upstream.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$up/" 10 ;;
  *) die "UPSTREAM must be nginx or fixed_upstream" ;;
esac
PT_ARGS=(); [ "${PT_TIMEOUTS:-0}" = 1 ] && PT_ARGS=(--timeouts)
"${ON_SERVER[@]}" "$PT_BIN" --listen "127.0.0.1:$pt" --upstream "127.0.0.1:$up" --threads "${KB_THREADS:-2}" "${PT_ARGS[@]}" \
  >"$TMP/passthrough.log" 2>&1 &
PT_PID=$!
PIDS+=($PT_PID)
case "${KB_MODE:-serve}" in
  serve) start_keybrake "http://127.0.0.1:$up" ;;
  edge) start_keybrake_edge "http://127.0.0.1:$up" ;;
  *) die "KB_MODE must be serve or edge" ;;
esac
wait_http "http://127.0.0.1:$pt/v1/payment_intents" 10 || die "passthrough did not start: $(tail -5 "$TMP/passthrough.log")"

new_tenant
control POST /v1/keys "$KB_TENANT_TOKEN" \
  '{"label":"load","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],"daily_usd_cap":1000000000,"expires_in":"1h"}' \
  >"$TMP/key.json"
VK=$(json_field token <"$TMP/key.json"); KEY_ID=$(json_field id <"$TMP/key.json")

# -- sanity: one request through each, before any load -------------------------------
BODY='amount=100&currency=usd'
code=$(curl -sS -o "$TMP/sanity.body" -D "$TMP/sanity.headers" -w '%{http_code}' --max-time 10 \
  -X POST "http://$KB_PROXY/stripe/v1/payment_intents" -H "Authorization: Bearer $VK" \
  -H 'Content-Type: application/x-www-form-urlencoded' --data "$BODY")
[ "$code" = 200 ] || die "sanity: POST /stripe/v1/payment_intents through keybrake -> $code (expected 200): $(cat "$TMP/sanity.body")"
grep -q '"pi_1"' "$TMP/sanity.body" || die "sanity: keybrake did not relay the upstream body: $(cat "$TMP/sanity.body")"
grep -qi "^x-keybrake-key-id: $KEY_ID" "$TMP/sanity.headers" || die "sanity: no 'x-keybrake-key-id: $KEY_ID' response header"
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X POST "http://127.0.0.1:$pt/v1/payment_intents" \
  -H "Authorization: Bearer $VK" -H 'Content-Type: application/x-www-form-urlencoded' --data "$BODY")
[ "$code" = 200 ] || die "sanity: POST /v1/payment_intents through the passthrough -> $code (expected 200)"

write_post_lua "$TMP/post.lua" "$BODY" "$VK"
# The same request, but each connection pauses before sending the next one: a random
# 0..2*PACED_DELAY_MS ms (mean PACED_DELAY_MS), so the connections do not fire together.
{ cat "$TMP/post.lua"; echo "function delay() return math.random(0, 2 * $PACED_DELAY_MS) end"; } >"$TMP/paced.lua"
PT_URL="http://127.0.0.1:$pt/v1/payment_intents"
KB_URL="http://$KB_PROXY/stripe/v1/payment_intents"

echo "proxy overhead: POST /v1/payment_intents (form body, metered), upstream $UPSTREAM, keybrake ${KB_MODE:-serve}"
[ "${PT_TIMEOUTS:-0}" = 1 ] && echo "  the passthrough sets Keybrake's default upstream timeouts (PT_TIMEOUTS=1)"
echo "  $ROUNDS x ${DURATION}s per target at $CONNS connections (wrk -t${WRK_THREADS:-1}), pingora threads ${KB_THREADS:-2}, $PIN_DESC"
echo "  warming up (${WARMUP}s each) ..."
run_wrk "$TMP/warm_pt.txt" "$PT_PID" "$CONNS" "$WARMUP" "$TMP/post.lua" "$PT_URL"
run_wrk "$TMP/warm_kb.txt" "$KB_PID" "$CONNS" "$WARMUP" "$TMP/post.lua" "$KB_URL"
kb_sent=$(( $(wrk_stats "$TMP/warm_kb.txt" | cut -d' ' -f6) + 1 )); kb_runs=1

# -- measured runs ----------------------------------------------------------------------
printf "\n%-6s %-6s %-12s %11s %8s %8s %8s %9s %11s %10s\n" phase round target "requests/s" "p50 ms" "p99 ms" "non-2xx" "sock-err" "server CPU" "other CPU"
: >"$TMP/results.tsv"
measure() { # phase round target conns seconds [lua script]
  local url pid f rps p50 p99 bad errs reqs
  if [ "$3" = passthrough ]; then url=$PT_URL; pid=$PT_PID; else url=$KB_URL; pid=$KB_PID; fi
  f="$TMP/$1.$2.$3.txt"
  run_wrk "$f" "$pid" "$4" "$5" "${6:-$TMP/post.lua}" "$url"
  read -r rps p50 p99 bad errs reqs < <(wrk_stats "$f")
  printf "%-6s %-6s %-12s %11s %8s %8s %8s %9s %10s%% %9s%%\n" "$1" "$2" "$3" "$rps" "$p50" "$p99" "$bad" "$errs" "$(cat "$f.cpu")" "$(cat "$f.other")"
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$1" "$2" "$3" "$rps" "$p50" "$p99" "$bad" "$errs" "$(cat "$f.cpu")" "$(cat "$f.other")" "$(cat "$f.sys")" >>"$TMP/results.tsv"
  if [ "$3" = keybrake ]; then kb_sent=$((kb_sent + reqs)); kb_runs=$((kb_runs + 1)); fi
  if [ "$bad" != 0 ] || [ "$errs" != 0 ]; then
    echo >&2
    echo "FAIL: $3: $bad non-2xx responses and $errs socket errors (connect/read/write/timeout) out of $reqs ($f)" >&2
    curl -sS -i --max-time 5 -X POST "$url" -H "Authorization: Bearer $VK" \
      -H 'Content-Type: application/x-www-form-urlencoded' --data "$BODY" >&2 || true
    echo >&2; echo "--- keybrake stderr (tail)" >&2; tail -20 "$TMP/keybrake.err" "$TMP/node.err" 2>/dev/null >&2
    exit 1
  fi
}
for r in $(seq 1 "$ROUNDS"); do
  measure load "$r" passthrough "$CONNS" "$DURATION"
  measure load "$r" keybrake "$CONNS" "$DURATION"
done
if [ "$PACED_CONNS" -gt 0 ]; then
  measure paced 1 passthrough "$PACED_CONNS" "$PACED_DURATION" "$TMP/paced.lua"
  measure paced 1 keybrake "$PACED_CONNS" "$PACED_DURATION" "$TMP/paced.lua"
fi
if [ "$LIGHT_CONNS" -gt 0 ]; then
  measure light 1 passthrough "$LIGHT_CONNS" "$LIGHT_DURATION"
  measure light 1 keybrake "$LIGHT_CONNS" "$LIGHT_DURATION"
fi

# -- summary ----------------------------------------------------------------------------
python3 - "$TMP/results.tsv" "$CONNS" "$LIGHT_CONNS" "${#ON_SERVER[@]}" "$PACED_CONNS" "$PACED_DELAY_MS" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
def agg(phase, target):
    rs = [r for r in rows if r[0] == phase and r[2] == target]
    if not rs:
        return None
    return (statistics.median(float(r[3]) for r in rs), statistics.median(float(r[5]) for r in rs),
            statistics.median(float(r[4]) for r in rs), statistics.median(float(r[8]) for r in rs))
pt, kb = agg("load", "passthrough"), agg("load", "keybrake")
print(f"\n=== SUMMARY (saturation, {sys.argv[2]} connections; medians over rounds)")
print(f"{'':22}{'passthrough':>14}{'keybrake':>14}")
print(f"{'requests/s':22}{pt[0]:>14,.0f}{kb[0]:>14,.0f}")
print(f"{'p50 latency ms':22}{pt[2]:>14.3f}{kb[2]:>14.3f}")
print(f"{'p99 latency ms':22}{pt[1]:>14.3f}{kb[1]:>14.3f}")
print(f"{'server CPU (1 core=100%)':22}{pt[3]:>12.0f}% {kb[3]:>12.0f}%")
print(f"throughput ratio keybrake/passthrough: {kb[0] / pt[0]:.3f}")
# Server CPU per request (us): what the ratio is made of when the server's core is the
# bottleneck, and steadier than requests/s on a VM whose speed drifts between runs.
def cpu_per_req(target, col=8):
    return statistics.median(float(r[col]) * 1e4 / float(r[3]) for r in rows
                             if r[0] == "load" and r[2] == target and float(r[3]) > 0)
cpt, ckb = cpu_per_req("passthrough"), cpu_per_req("keybrake")
print(f"server CPU per request: passthrough {cpt:.1f} us, keybrake {ckb:.1f} us -> ratio {cpt / ckb:.3f}")
kpt, kkb = cpu_per_req("passthrough", 10), cpu_per_req("keybrake", 10)
print(f"  of which in the kernel: passthrough {kpt:.1f} us, keybrake {kkb:.1f} us")
print(f"added p99 (keybrake - passthrough):    {kb[1] - pt[1]:+.3f} ms")
ppt, pkb = agg("paced", "passthrough"), agg("paced", "keybrake")
if ppt and pkb:
    print(f"paced load ({sys.argv[5]} connections, {sys.argv[6]} ms between requests): "
          f"passthrough {ppt[0]:,.0f} req/s p50 {ppt[2]:.3f} / p99 {ppt[1]:.3f} ms, "
          f"keybrake {pkb[0]:,.0f} req/s p50 {pkb[2]:.3f} / p99 {pkb[1]:.3f} ms -> "
          f"added p50 {pkb[2] - ppt[2]:+.3f} ms, added p99 {pkb[1] - ppt[1]:+.3f} ms")
lpt, lkb = agg("light", "passthrough"), agg("light", "keybrake")
if lpt and lkb:
    print(f"light load ({sys.argv[3]} connection(s)): passthrough p50 {lpt[2]:.3f} / p99 {lpt[1]:.3f} ms, "
          f"keybrake p50 {lkb[2]:.3f} / p99 {lkb[1]:.3f} ms -> added p50 {lkb[2] - lpt[2]:+.3f} ms, "
          f"added p99 {lkb[1] - lpt[1]:+.3f} ms")
pinned = sys.argv[4] != "0"   # unpinned, "other" includes wrk and nginx themselves
disturbed = [f"{r[0]} {r[1]} {r[2]}" for r in rows if pinned and float(r[9]) > 15]
if disturbed:
    print(f"WARNING: other processes used > 15% of the server's CPUs during: {', '.join(disturbed)} "
          "- those numbers are not reliable; rerun on an idle machine")
if pt[3] < 85:
    print(f"note: the passthrough used only {pt[3]:.0f}% of a core: the load generator or the upstream "
          "may be the bottleneck, which understates the ratio's gap")
PY

# -- spend bookkeeping after the load: a mismatch fails the run ----------------------------
# Each request reserved $1.00 (amount=100 usd). wrk counts completed requests only; up to
# CONNS requests per run were still in flight when wrk stopped and may have been charged.
sleep 3   # leases idle for return_idle_after_seconds (2 s) go back to the ledger
control GET "/v1/keys/$KEY_ID" "$KB_TENANT_TOKEN" >"$TMP/key_after.json"
python3 - "$TMP/key_after.json" "$kb_sent" "$(( kb_runs * CONNS ))" "${KB_METRICS}" <<'PY' || die "spent_today_usd does not match the requests sent"
import json, sys, urllib.request
k = json.load(open(sys.argv[1]))
sent, inflight = int(sys.argv[2]), int(sys.argv[3])
spent, held = k.get("spent_today_usd"), k.get("held_usd")
settled = spent - (held or 0)
ok = sent <= settled <= sent + inflight
print(f"\nspend: spent_today_usd={spent} held_usd={held} -> settled ${settled:,.2f} for {sent:,} requests "
      f"counted by wrk (+ up to {inflight} in flight at stops): {'consistent' if ok else 'MISMATCH'}")
try:
    text = urllib.request.urlopen(f"http://{sys.argv[4]}/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith(("keybrake_overhead_seconds_sum", "keybrake_overhead_seconds_count")):
            name, v = line.rsplit(" ", 1)
            vals[name.split("{")[0]] = vals.get(name.split("{")[0], 0) + float(v)
    if vals.get("keybrake_overhead_seconds_count"):
        mean = vals["keybrake_overhead_seconds_sum"] / vals["keybrake_overhead_seconds_count"]
        print(f"keybrake_overhead_seconds (self-reported): mean {mean * 1e6:.1f} us over "
              f"{vals['keybrake_overhead_seconds_count']:,.0f} requests")
except Exception as e:
    print(f"(metrics not read: {e})")
sys.exit(0 if ok else 1)
PY
if [ -f "${ACCESS_LOG:-$TMP/access.log}" ]; then
  echo "keybrake access-log lines: $(wc -l <"${ACCESS_LOG:-$TMP/access.log}")"
fi
