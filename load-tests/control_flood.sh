#!/usr/bin/env bash
# Revocation while one tenant floods the control API with quick valid requests: wrk (from
# 127.0.0.1) keeps CONNS keep-alive connections busy with `GET /v1/keys/{id}` of the
# attacker's own key, while another tenant revokes REVOKES keys one after another, each on
# a new connection from VICTIM_SOURCE (default 127.0.0.1, the attacker's own address, as
# behind one NAT), and calls the proxy with each revoked key. The control listener allows
# 64 connections per address (and 8 more waiting for a place): CONNS=64 fills them with
# busy connections, CONNS=200 also keeps the waiting places full of wrk's reconnections.
#
# Prints how many revocations were refused (the connection closed unanswered: the key
# keeps working), their latency (p50, p90, max) and how many revoked keys the proxy still
# accepted. Fails if any revocation was refused or any revoked key was accepted.
#
#   cargo build --release --bin keybrake
#   load-tests/control_flood.sh
#
# Env knobs: CONNS (200)  REVOKES (30)  VICTIM_SOURCE (127.0.0.1)  KB_BIN (the binary;
# compare two builds with it)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
CONNS=${CONNS:-200}; REVOKES=${REVOKES:-30}; VICTIM_SOURCE=${VICTIM_SOURCE:-127.0.0.1}
need wrk
need_bin "$KB_BIN" "cargo build --release --bin keybrake"

# The proxy refuses a revoked key before any upstream: none is needed.
start_keybrake "http://127.0.0.1:9"
new_tenant; ATTACKER=$KB_TENANT_TOKEN
new_tenant; VICTIM=$KB_TENANT_TOKEN
KEY_BODY='{"label":"flood","vendor":"stripe","allowed_endpoints":["GET /v1/customers"],"daily_usd_cap":1,"expires_in":"1h"}'
OWN=$(control POST /v1/keys "$ATTACKER" "$KEY_BODY" | json_field id)
for i in $(seq 1 "$REVOKES"); do control POST /v1/keys "$VICTIM" "$KEY_BODY"; echo; done >"$TMP/victim_keys.jsonl"

cat >"$TMP/flood.lua" <<LUA
wrk.method = "GET"
wrk.headers["authorization"] = "Bearer $ATTACKER"
LUA
wrk -t2 -c"$CONNS" --latency -d"$(( REVOKES / 5 + 8 ))s" --timeout 5s -s "$TMP/flood.lua" \
  "http://$KB_CONTROL/v1/keys/$OWN" >"$TMP/wrk.out" 2>&1 &
WRK_PID=$!
sleep 2

status=0
python3 - "$KB_CONTROL" "$KB_PROXY" "$VICTIM" "$TMP/victim_keys.jsonl" "$VICTIM_SOURCE" <<'PY' || status=$?
import http.client, json, sys, time
control, proxy, token, keys_file, source = sys.argv[1:]
keys = [json.loads(line) for line in open(keys_file) if line.strip()]
refused, accepted, took = 0, 0, []
for key in keys:
    host, port = control.split(":")
    started = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
        c.request("DELETE", f"/v1/keys/{key['id']}", headers={"authorization": f"Bearer {token}"})
        status = c.getresponse().status
        c.close()
    except (OSError, http.client.HTTPException):
        status = 0
    took.append((time.monotonic() - started) * 1000)
    if status != 200:
        refused += 1
    host, port = proxy.split(":")
    p = http.client.HTTPConnection(host, int(port), timeout=10)
    p.request("GET", "/stripe/v1/customers", headers={"authorization": f"Bearer {key['token']}"})
    if p.getresponse().status != 401:
        accepted += 1
    p.close()
    time.sleep(0.1)
took.sort()
pct = lambda q: took[min(len(took) - 1, int(q * len(took)))]
print(f"revocations refused: {refused}/{len(keys)}; latency ms p50 {pct(0.5):.1f}, "
      f"p90 {pct(0.9):.1f}, max {took[-1]:.1f}; revoked keys still accepted: {accepted}")
sys.exit(1 if refused or accepted else 0)
PY
wait "$WRK_PID" || true; WRK_PID=
echo "flood: $(wrk_stats "$TMP/wrk.out" | awk '{printf "%s req/s, p99 %s ms", $1, $3}') over $CONNS connections"
[ "$status" = 0 ] || die "a revocation was refused or a revoked key accepted"
