#!/usr/bin/env bash
# User-space instructions per request, Keybrake vs the bare Pingora passthrough, counted by
# valgrind's callgrind over every thread of each process (audit writer and access-log
# thread included). Unlike requests/s on a shared VM, this count barely moves between runs,
# so it shows what a change to the pipeline saves. Kernel time (syscalls) is not counted.
#
# Same setup as proxy_overhead.sh: nginx as the vendor, the metered Stripe POST, 4
# connections. Each server runs under callgrind; counting is switched on only for a
# MEASURE-second wrk run after a WARMUP-second one, and for IDLE seconds with no load
# before it (the background taken out of the "net" figure).
#
#   cargo build --release --bin keybrake --examples
#   load-tests/instructions_per_request.sh          # ~1 min; needs valgrind
#
# Env knobs: WARMUP (s, 3)  MEASURE (s, 10)  IDLE (s of no load counted, 5)  TOP (functions listed per process, 0)
# KEEP_TMP (1 keeps the callgrind files; open them with callgrind_annotate)
# PT_TIMEOUTS (1: the passthrough sets Keybrake's default upstream timeouts).
set -euo pipefail
export PIN=0
source "$(dirname "$0")/lib.sh"
WARMUP=${WARMUP:-3}; MEASURE=${MEASURE:-10}; IDLE=${IDLE:-5}; TOP=${TOP:-0}
need wrk
need curl
need valgrind valgrind
need_bin "$KB_BIN" "cargo build --release --bin keybrake"
PT_BIN="$KB_ROOT/target/release/examples/passthrough"
need_bin "$PT_BIN" "cargo build --release --example passthrough"

VG=(valgrind --tool=callgrind --instr-atstart=no)
up=$(free_port); pt=$(free_port)
start_nginx "$up"
ON_SERVER=("${VG[@]}" "--callgrind-out-file=$TMP/kb.callgrind")
start_keybrake "http://127.0.0.1:$up"
PT_ARGS=(); [ "${PT_TIMEOUTS:-0}" = 1 ] && PT_ARGS=(--timeouts)
"${VG[@]}" "--callgrind-out-file=$TMP/pt.callgrind" "$PT_BIN" --listen "127.0.0.1:$pt" \
  --upstream "127.0.0.1:$up" --threads 2 "${PT_ARGS[@]}" >"$TMP/pt.log" 2>&1 &
PT_PID=$!; PIDS+=("$PT_PID")
wait_http "http://127.0.0.1:$pt/v1/payment_intents" 60
new_tenant
control POST /v1/keys "$KB_TENANT_TOKEN" '{"label":"load","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],"daily_usd_cap":1000000000,"expires_in":"1h"}' >"$TMP/key.json"
VK=$(json_field token <"$TMP/key.json")
write_post_lua "$TMP/post.lua" 'amount=100&currency=usd' "$VK"

echo "instructions per request (callgrind, all threads, user space), ${MEASURE}s at 4 connections"
for target in passthrough keybrake; do
  if [ $target = keybrake ]; then url="http://$KB_PROXY/stripe/v1/payment_intents"; pid=$KB_PID; out=$TMP/kb.callgrind
  else url="http://127.0.0.1:$pt/v1/payment_intents"; pid=$PT_PID; out=$TMP/pt.callgrind; fi
  wrk -t1 -c4 -d"${WARMUP}s" -s "$TMP/post.lua" "$url" >/dev/null
  # What the process runs with no request at all (timers, background tasks), counted
  # over IDLE seconds, so it can be taken out of the per-request figure: under callgrind
  # the request rate is low and varies, and this background would otherwise vary it.
  # First a pause, so the warm-up's tail (spend report, checkpoint) is not counted as idle.
  # Each dump holds only what was counted since the previous one. Both windows are timed
  # from switching counting on to switching it off.
  idle=0; idle_secs=0
  if [ "$IDLE" != 0 ]; then
    sleep 1
    t0=$(date +%s.%N)
    callgrind_control -i on "$pid" >/dev/null
    sleep "$IDLE"
    callgrind_control -i off "$pid" >/dev/null
    t1=$(date +%s.%N)
    callgrind_control -d "$pid" >/dev/null
    dump=$(ls -t "$out"*); dump=${dump%%$'\n'*}
    idle=$(callgrind_annotate --auto=no "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen {gsub(",", "", $1); print $1; seen = 1}')
    idle_secs=$(python3 -c "print($t1 - $t0)")
  fi
  t0=$(date +%s.%N)
  callgrind_control -i on "$pid" >/dev/null
  wrk -t1 -c4 -d"${MEASURE}s" -s "$TMP/post.lua" "$url" >"$TMP/$target.wrk"
  callgrind_control -i off "$pid" >/dev/null
  t1=$(date +%s.%N)
  callgrind_control -d "$pid" >/dev/null
  reqs=$(awk '/requests in/{print $1}' "$TMP/$target.wrk")
  non2xx=$(awk '/Non-2xx/{print $NF}' "$TMP/$target.wrk"); non2xx=${non2xx:-0}
  dump=$(ls -t "$out"*); dump=${dump%%$'\n'*}       # the newest dump (no pipe into head: pipefail)
  callgrind_annotate --auto=no "$dump" >"$TMP/$target.annotate" 2>/dev/null
  total=$(awk '/PROGRAM TOTALS/ && !seen {gsub(",", "", $1); print $1; seen = 1}' "$TMP/$target.annotate")
  rate=$(python3 -c "print(${idle:-0} / $idle_secs if $idle_secs > 0 else 0)")
  net=$(python3 -c "print(round($total - $rate * ($t1 - $t0)))")
  printf "%-12s %9s instructions/request over %s requests (non-2xx: %s); %s net of %s/s idle background\n" "$target" \
    "$(python3 -c "print(f'{$total / $reqs:,.0f}')")" "$reqs" "$non2xx" \
    "$(python3 -c "print(f'{$net / $reqs:,.0f}')")" "$(python3 -c "print(f'{$rate:,.0f}')")"
  echo "$total $reqs $net" >"$TMP/$target.total"
  [ "$non2xx" = 0 ] || { echo "FAIL: $target answered non-2xx" >&2; exit 1; }
  if [ "$TOP" -gt 0 ]; then
    grep -E '^ *[0-9,]+ ' "$TMP/$target.annotate" | grep -v TOTALS | awk -v n="$TOP" 'NR <= n' | cut -c1-160
  fi
done
python3 - "$TMP/keybrake.total" "$TMP/passthrough.total" <<'PY'
import sys
(kt, kr, kn), (pt, pr, pn) = [map(int, open(f).read().split()) for f in sys.argv[1:]]
k, p = kt / kr, pt / pr
print(f"keybrake / passthrough: {k / p:.2f}x the instructions (+{k - p:,.0f} per request)")
k, p = kn / kr, pn / pr
print(f"net of idle background: {k / p:.2f}x the instructions (+{k - p:,.0f} per request)")
PY
