#!/usr/bin/env bash
# A flood on an exhausted key: what refusing it costs the proxy and the ledger. One key with
# a $1 daily cap spends it (one metered Stripe call, POST /stripe/v1/payment_intents with
# `amount=100&currency=usd`), its spend is settled (the key idles, its lease comes back),
# then wrk sends the same call with that key as fast as it can: every answer is 429
# `cap_exhausted`, and none may reach the upstream.
#
# Prints refused requests/s, p99, the proxy's CPU per refused request, and what the ledger
# did meanwhile: on `serve`, the CPU of its SQLite connection thread; on an edge node
# (KB_MODE=edge), the lease requests it sent the control plane and the control plane's CPU.
# A lease answer carries the key's settled spend, and a proxy refuses calls beyond
# `cap − settled` without asking again (docs/metering.md), so after the first refusal the
# ledger should see nothing. Fails on any answer other than 429, or if the key's settled
# spend moved.
#
#   cargo build --release --bin keybrake
#   load-tests/exhausted_flood.sh
#
# Env knobs: KB_MODE (serve | edge)  DURATION (s, 5)  CONNS (32)  KB_THREADS (2)  PIN (1)
# CONTROL_CPUS (edge: the control plane's CPUs; default the server's)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-5}; CONNS=${CONNS:-32}

start_by_mode
control POST /v1/keys "$KB_TENANT_TOKEN" \
  '{"label":"flood","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],"daily_usd_cap":1,"expires_in":"1h"}' \
  >"$TMP/key.json"
KEY=$(json_field token <"$TMP/key.json"); KEY_ID=$(json_field id <"$TMP/key.json")
BODY='amount=100&currency=usd'
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X POST "http://$KB_PROXY/stripe/v1/payment_intents" \
  -H "authorization: Bearer $KEY" --data "$BODY")
[ "$code" = 200 ] || die "the key's one payment: HTTP $code"

# spent_held -> "SPENT HELD" of the key, in USD
spent_held() {
  control GET "/v1/keys/$KEY_ID" "$KB_TENANT_TOKEN" |
    python3 -c 'import sys,json; k=json.load(sys.stdin); print(k["spent_today_usd"], k["held_usd"])'
}
settled=
for _ in $(seq 1 100); do
  read -r spent held < <(spent_held)
  if python3 -c "import sys; sys.exit(0 if float('$spent') == 1 and float('$held') == 0 else 1)"; then settled=1; break; fi
  sleep 0.1
done
[ -n "$settled" ] || die "the key's spend was not settled within 10 s (spent $spent, held $held)"

# thread_ticks PID NAME -> user+system ticks of the process's threads called NAME
thread_ticks() {
  local t total=0
  for t in /proc/"$1"/task/*; do
    [ "$(cat "$t/comm" 2>/dev/null)" = "$2" ] || continue
    total=$((total + $(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}

write_post_lua "$TMP/flood.lua" "$BODY" "$KEY"
if [ "${KB_MODE:-serve}" = edge ]; then
  l0=$(metric keybrake_lease_requests_total); c0=$(cpu_ticks "$KB_CONTROL_PID")
else
  q0=$(thread_ticks "$KB_PID" sqlx-sqlite-wor)
fi
s0=$(date +%s.%N)
run_wrk "$TMP/flood.txt" "$KB_PID" "$CONNS" "$DURATION" "$TMP/flood.lua" "http://$KB_PROXY/stripe/v1/payment_intents"
s1=$(date +%s.%N)
read -r rps p50 p99 bad errs reqs < <(wrk_stats "$TMP/flood.txt")
grep -q "Non-2xx" "$TMP/flood.txt" || die "some answers were 2xx"
[ "$bad" = "$reqs" ] || die "$((reqs - bad)) of $reqs answers were 2xx"
[ "$errs" = 0 ] || die "$errs socket errors"
us=$(python3 -c "print(f'{float($(cat "$TMP/flood.txt.cpu")) * 1e4 / max(float($rps), 1):.1f}')")
echo "exhausted key flooded through keybrake ${KB_MODE:-serve} ($PIN_DESC${CONTROL_CPUS:+, control plane on CPU $CONTROL_CPUS}), $CONNS connections, $DURATION s"
echo "  refused: $reqs requests, $rps req/s, p50 $p50 ms, p99 $p99 ms; proxy CPU $(cat "$TMP/flood.txt.cpu")%, $us µs per refused request"
if [ "${KB_MODE:-serve}" = edge ]; then
  l1=$(metric keybrake_lease_requests_total); c1=$(cpu_ticks "$KB_CONTROL_PID")
  python3 -c "print(f'  ledger: {int($l1 - $l0)} lease requests to the control plane ({($l1 - $l0) * 1000 / max($reqs, 1):.1f} per 1,000 refused); control plane CPU {($c1 - $c0) / $CLK_TCK / ($s1 - $s0) * 100:.0f}%')"
else
  q1=$(thread_ticks "$KB_PID" sqlx-sqlite-wor)
  python3 -c "print(f'  ledger: the SQLite connection thread used {($q1 - $q0) / $CLK_TCK / ($s1 - $s0) * 100:.1f}% of a CPU')"
fi
# Idle again: the key's spend still $1, nothing held (nothing reached the upstream).
for _ in $(seq 1 100); do
  read -r spent held < <(spent_held)
  python3 -c "import sys; sys.exit(0 if float('$held') == 0 else 1)" && break
  sleep 0.1
done
python3 -c "import sys; sys.exit(0 if float('$spent') == 1 and float('$held') == 0 else 1)" ||
  die "after the flood the key shows spent $spent, held $held (expected 1, 0)"
echo "  the key's settled spend after the flood: \$$spent (unchanged)"
