#!/usr/bin/env bash
# What `audit.durability: strict` costs: the same metered call (POST /v1/payment_intents,
# $1, form body, one vault key) through `keybrake serve` with `normal`, then with
# `strict`, each against a local nginx answering a fixed PaymentIntent. Prints requests/s,
# p50 and p99 of each and the difference, then checks that every call wrk counted in the
# strict run is in the audit trail (strict mode releases a response only once its event
# is committed and synced).
#
#   cargo build --release --bin keybrake
#   load-tests/audit_durability.sh
#
# KB_MODE=edge runs the same against an edge node (`keybrake proxy`) and its control plane
# (both with the mode under test): in strict mode a node releases a response once the
# control plane answered that the batch holding its event is written.
#
# Env knobs: DURATION (s, 10)  CONNS (16)  WARMUP (s, 2)  KB_THREADS (2)  PIN (1)  KEEP_TMP (1)
# KB_MODE (serve | edge)  CONTROL_CPUS (edge: the control plane's CPUs; default the server's).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-10}; CONNS=${CONNS:-16}; WARMUP=${WARMUP:-2}

need wrk
need curl
need_bin "$KB_BIN" "cargo build --release --bin keybrake"
up=$(free_port)
start_nginx "$up"

declare -A RESULT
for mode in normal strict; do
  rm -rf "$TMP/data"   # each run its own store (start_keybrake draws a new master key)
  case "${KB_MODE:-serve}" in
    serve) AUDIT_DURABILITY=$mode start_keybrake "http://127.0.0.1:$up" ;;
    edge) AUDIT_DURABILITY=$mode start_keybrake_edge "http://127.0.0.1:$up" ;;
    *) die "KB_MODE must be serve or edge" ;;
  esac
  new_tenant
  control POST /v1/keys "$KB_TENANT_TOKEN" \
    '{"label":"audit","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],"daily_usd_cap":1000000000,"expires_in":"1h"}' \
    >"$TMP/key.json"
  VK=$(json_field token <"$TMP/key.json"); KEY_ID=$(json_field id <"$TMP/key.json")
  write_post_lua "$TMP/post.lua" 'amount=100&currency=usd' "$VK"
  run_wrk "$TMP/warm_$mode.txt" "$KB_PID" "$CONNS" "$WARMUP" "$TMP/post.lua" "http://$KB_PROXY/stripe/v1/payment_intents"
  run_wrk "$TMP/run_$mode.txt" "$KB_PID" "$CONNS" "$DURATION" "$TMP/post.lua" "http://$KB_PROXY/stripe/v1/payment_intents"
  RESULT[$mode]=$(wrk_stats "$TMP/run_$mode.txt")
  if [ "$mode" = strict ]; then
    # Every answered call of both runs is in the trail (warm-up + run, + the sanity-free
    # start): count the key's events through the API.
    answered=$(( $(wrk_stats "$TMP/warm_$mode.txt" | awk '{print $6}') + $(echo "${RESULT[$mode]}" | awk '{print $6}') ))
    sleep 1
    events=$(KB_CONTROL=$KB_CONTROL TOKEN=$KB_TENANT_TOKEN KEY=$KEY_ID python3 - <<'PY'
import json, os, urllib.request
base, token, key = f"http://{os.environ['KB_CONTROL']}", os.environ["TOKEN"], os.environ["KEY"]
n, cursor = 0, None
for _ in range(10000):
    url = f"{base}/v1/audit?key_id={key}&limit=1000" + (f"&cursor={cursor}" if cursor else "")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    page = json.load(urllib.request.urlopen(req, timeout=30))
    n += len(page["data"])
    cursor = page["next_cursor"]
    if not cursor:
        break
print(n)
PY
)
  fi
  for pid in "$KB_PID" ${KB_CONTROL_PID:-}; do kill -INT "$pid"; wait "$pid" 2>/dev/null || true; done
  KB_CONTROL_PID=
done

read -r n_rps n_p50 n_p99 n_bad _ <<<"${RESULT[normal]}"
read -r s_rps s_p50 s_p99 s_bad _ <<<"${RESULT[strict]}"
echo "audit durability, keybrake ${KB_MODE:-serve}, $CONNS connections, ${DURATION}s each, pingora threads ${KB_THREADS:-2}, $PIN_DESC"
printf '  normal: %6.0f req/s  p50 %7.3f ms  p99 %7.3f ms  non-2xx %s\n' "$n_rps" "$n_p50" "$n_p99" "$n_bad"
printf '  strict: %6.0f req/s  p50 %7.3f ms  p99 %7.3f ms  non-2xx %s\n' "$s_rps" "$s_p50" "$s_p99" "$s_bad"
python3 -c "print(f'  strict costs {(1 - $s_rps / $n_rps) * 100:.1f}% of throughput and adds {$s_p99 - $n_p99:.3f} ms at p99')"
echo "  strict run: $answered calls counted by wrk, $events audit events for the key (every answered call needs one; calls in flight when wrk stopped may add a few)"
[ "$events" -ge "$answered" ] || die "strict: $answered answered calls but only $events audit events"
