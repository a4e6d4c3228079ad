#!/usr/bin/env bash
# What the look-up before a response-metered call costs: Keybrake reads a PaymentIntent
# (GET /v1/payment_intents/{id}, with the real secret) to reserve its amount before it
# forwards the confirm (SPEC §5). Both requests go through the same Keybrake to the same
# nginx (the fixed PaymentIntent JSON of proxy_overhead.sh):
#   create:  POST /stripe/v1/payment_intents                (one upstream round trip)
#   confirm: POST /stripe/v1/payment_intents/pi_1/confirm  (look-up + the confirm)
# Prints requests/s, p50 and p99 of each at LIGHT_CONNS connections (latency without
# queueing) and at CONNS (saturation), and the difference: the look-up's cost.
#
#   cargo build --release --bin keybrake
#   load-tests/confirm_round_trip.sh
#
# Env knobs: DURATION (s per run, 10)  LIGHT_CONNS (1)  CONNS (32)  ROUNDS (2, alternating)
# KB_THREADS, PIN, SERVER_CPUS / LOAD_CPUS, KEEP_TMP as in proxy_overhead.sh.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-10}; LIGHT_CONNS=${LIGHT_CONNS:-1}; CONNS=${CONNS:-32}; ROUNDS=${ROUNDS:-2}

need wrk
need curl
need_bin "$KB_BIN" "cargo build --release --bin keybrake"

up=$(free_port)
start_nginx "$up"
start_keybrake "http://127.0.0.1:$up"
new_tenant
control POST /v1/keys "$KB_TENANT_TOKEN" \
  '{"label":"load","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents","POST /v1/payment_intents/*/confirm"],"daily_usd_cap":1000000000,"expires_in":"1h"}' \
  >"$TMP/key.json"
VK=$(json_field token <"$TMP/key.json")

CREATE_URL="http://$KB_PROXY/stripe/v1/payment_intents"
CONFIRM_URL="http://$KB_PROXY/stripe/v1/payment_intents/pi_1/confirm"
for url in "$CREATE_URL" "$CONFIRM_URL"; do
  code=$(curl -sS -o "$TMP/sanity.body" -w '%{http_code}' --max-time 10 -X POST "$url" \
    -H "Authorization: Bearer $VK" -H 'Content-Type: application/x-www-form-urlencoded' \
    --data 'amount=100&currency=usd')
  [ "$code" = 200 ] || die "sanity: POST $url -> $code: $(cat "$TMP/sanity.body")"
done
write_post_lua "$TMP/create.lua" 'amount=100&currency=usd' "$VK"
write_post_lua "$TMP/confirm.lua" '' "$VK"

echo "confirm round trip: create vs confirm (look-up + confirm) through one keybrake, upstream nginx"
printf "%-6s %-5s %-8s %11s %8s %8s %8s\n" conns round call "requests/s" "p50 ms" "p99 ms" "non-2xx"
: >"$TMP/results.tsv"
for conns in "$LIGHT_CONNS" "$CONNS"; do
  for r in $(seq 1 "$ROUNDS"); do
    for call in create confirm; do
      url=$CREATE_URL; [ "$call" = confirm ] && url=$CONFIRM_URL
      f="$TMP/$conns.$r.$call.txt"
      run_wrk "$f" "$KB_PID" "$conns" "$DURATION" "$TMP/$call.lua" "$url"
      read -r rps p50 p99 bad _ _ < <(wrk_stats "$f")
      printf "%-6s %-5s %-8s %11s %8s %8s %8s\n" "$conns" "$r" "$call" "$rps" "$p50" "$p99" "$bad"
      printf "%s\t%s\t%s\t%s\t%s\n" "$conns" "$call" "$rps" "$p50" "$p99" >>"$TMP/results.tsv"
      [ "$bad" = 0 ] || die "$call answered $bad non-2xx responses ($f)"
    done
  done
done
python3 - "$TMP/results.tsv" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
for conns in dict.fromkeys(r[0] for r in rows):
    med = {}
    for call in ("create", "confirm"):
        sel = [r for r in rows if r[0] == conns and r[1] == call]
        med[call] = [statistics.median(float(r[i]) for r in sel) for i in (2, 3, 4)]
    c, f = med["create"], med["confirm"]
    print(f"{conns} conn(s): create {c[0]:.0f} req/s p50 {c[1]:.3f} p99 {c[2]:.3f} ms; "
          f"confirm {f[0]:.0f} req/s p50 {f[1]:.3f} p99 {f[2]:.3f} ms; "
          f"look-up adds p50 {f[1] - c[1]:+.3f} ms, p99 {f[2] - c[2]:+.3f} ms, "
          f"throughput x{f[0] / c[0]:.2f}")
PY
