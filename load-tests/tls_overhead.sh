#!/usr/bin/env bash
# HTTPS: Keybrake's TLS proxy listener vs a bare Pingora TLS passthrough, same machine,
# same run, same local upstream (nginx, plain HTTP), same certificate (a test CA and leaf
# made here with openssl; ECDSA P-256).
#
#   keybrake:    https://<proxy>/stripe/v1/payment_intents   proxy.tls (rustls; TLS handshake
#                inside Keybrake's listener, header deadline, connection table), then the
#                full metered hot path of proxy_overhead.sh
#   passthrough: https://<passthrough>/v1/payment_intents    examples/passthrough.rs
#                --tls-cert/--tls-key: Pingora's own TLS listener, forwarding unchanged
#
# Two loads, alternating targets for ROUNDS rounds:
#   keep-alive  CONNS connections, each sending requests back to back (one handshake each);
#   handshakes  HS_CONNS connections sending `Connection: close`: every request is a new
#               TCP connection and a full TLS handshake (wrk resumes no session), so
#               requests/s is the full-handshake rate.
# Prints requests/s and p50/p99 per run and the keybrake/passthrough ratios (medians).
#
#   cargo build --release --bin keybrake --example passthrough
#   load-tests/tls_overhead.sh
#
# Env knobs: DURATION (s per run, 10)  CONNS (32)  HS_CONNS (16)  ROUNDS (3)  WARMUP (3)
# WRK_THREADS (1)  KB_THREADS (2)  PIN (1)  KEEP_TMP (1 keeps the temp dir).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-10}; CONNS=${CONNS:-32}; HS_CONNS=${HS_CONNS:-16}; ROUNDS=${ROUNDS:-3}; WARMUP=${WARMUP:-3}
PT_BIN="$KB_ROOT/target/release/examples/passthrough"

need wrk
need curl
need openssl
need_bin "$KB_BIN" "cargo build --release --bin keybrake"
need_bin "$PT_BIN" "cargo build --release --example passthrough"

# -- certificates ------------------------------------------------------------------------
PKI="$TMP/pki"; mkdir -p "$PKI"
(
  cd "$PKI"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj "/CN=Keybrake load CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' >leaf.ext
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -out leaf.csr \
    -subj "/CN=127.0.0.1" 2>/dev/null
  openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -set_serial 1 -days 2 -extfile leaf.ext \
    -out leaf.pem 2>/dev/null
) || die "openssl could not make the test certificates"

# -- upstream, passthrough, keybrake -----------------------------------------------------
up=$(free_port); pt=$(free_port)
start_nginx "$up"
"${ON_SERVER[@]}" "$PT_BIN" --listen "127.0.0.1:$pt" --upstream "127.0.0.1:$up" --threads "${KB_THREADS:-2}" \
  --tls-cert "$PKI/leaf.pem" --tls-key "$PKI/leaf.key" >"$TMP/passthrough.log" 2>&1 &
PT_PID=$!
PIDS+=($PT_PID)
KB_EXTRA_YAML="proxy:
  tls:
    cert_file: $PKI/leaf.pem
    key_file: $PKI/leaf.key" start_keybrake "http://127.0.0.1:$up"

new_tenant
control POST /v1/keys "$KB_TENANT_TOKEN" \
  '{"label":"load","vendor":"stripe","allowed_endpoints":["POST /v1/payment_intents"],"daily_usd_cap":1000000000,"expires_in":"1h"}' \
  >"$TMP/key.json"
VK=$(json_field token <"$TMP/key.json")

BODY='amount=100&currency=usd'
PT_URL="https://127.0.0.1:$pt/v1/payment_intents"
KB_URL="https://$KB_PROXY/stripe/v1/payment_intents"
for url in "$PT_URL" "$KB_URL"; do
  for _ in $(seq 1 50); do curl -s -o /dev/null --cacert "$PKI/ca.pem" --max-time 1 "$url" && break; sleep 0.1; done
  code=$(curl -sS -o "$TMP/sanity.body" -w '%{http_code} %{http_version}' --max-time 10 --cacert "$PKI/ca.pem" \
    -X POST "$url" -H "Authorization: Bearer $VK" -H 'Content-Type: application/x-www-form-urlencoded' --data "$BODY")
  [ "${code%% *}" = 200 ] || die "sanity: POST $url -> $code: $(cat "$TMP/sanity.body")"
  echo "sanity: $url -> HTTP/${code#* } 200 (certificate verified against the test CA)"
done

write_post_lua "$TMP/post.lua" "$BODY" "$VK"
{ cat "$TMP/post.lua"; echo 'wrk.headers["Connection"] = "close"'; } >"$TMP/close.lua"

echo "TLS overhead: POST /v1/payment_intents (metered) over HTTPS, upstream nginx (plain HTTP)"
echo "  $ROUNDS rounds x ${DURATION}s: keep-alive at $CONNS connections, full handshakes at $HS_CONNS; pingora threads ${KB_THREADS:-2}, $PIN_DESC"
run_wrk "$TMP/warm_pt.txt" "$PT_PID" "$CONNS" "$WARMUP" "$TMP/post.lua" "$PT_URL"
run_wrk "$TMP/warm_kb.txt" "$KB_PID" "$CONNS" "$WARMUP" "$TMP/post.lua" "$KB_URL"

printf "\n%-10s %-6s %-12s %11s %8s %8s %8s %9s %11s\n" load round target "requests/s" "p50 ms" "p99 ms" "non-2xx" "sock-err" "server CPU"
: >"$TMP/results.tsv"
measure() { # load round target conns lua
  local url pid f rps p50 p99 bad errs reqs
  if [ "$3" = passthrough ]; then url=$PT_URL; pid=$PT_PID; else url=$KB_URL; pid=$KB_PID; fi
  f="$TMP/$1.$2.$3.txt"
  run_wrk "$f" "$pid" "$4" "$DURATION" "$5" "$url"
  read -r rps p50 p99 bad errs reqs < <(wrk_stats "$f")
  printf "%-10s %-6s %-12s %11s %8s %8s %8s %9s %10s%%\n" "$1" "$2" "$3" "$rps" "$p50" "$p99" "$bad" "$errs" "$(cat "$f.cpu")"
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$1" "$2" "$3" "$rps" "$p50" "$p99" "$bad" "$errs" "$(cat "$f.cpu")" >>"$TMP/results.tsv"
  [ "$bad" = 0 ] || die "$3 answered $bad non-2xx responses ($f)"
}
for r in $(seq 1 "$ROUNDS"); do
  measure keep-alive "$r" passthrough "$CONNS" "$TMP/post.lua"
  measure keep-alive "$r" keybrake "$CONNS" "$TMP/post.lua"
done
for r in $(seq 1 "$ROUNDS"); do
  measure handshake "$r" passthrough "$HS_CONNS" "$TMP/close.lua"
  measure handshake "$r" keybrake "$HS_CONNS" "$TMP/close.lua"
done

python3 - "$TMP/results.tsv" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
def med(load, target, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == load and r[2] == target)
print("\n=== SUMMARY (medians over rounds)")
for load, what in (("keep-alive", "requests/s"), ("handshake", "full handshakes/s")):
    pt, kb = med(load, "passthrough", 3), med(load, "keybrake", 3)
    print(f"{load:10} {what:18} passthrough {pt:>9,.0f}  keybrake {kb:>9,.0f}  ratio {kb / pt:.3f}  "
          f"p99 ms {med(load, 'passthrough', 5):.3f} / {med(load, 'keybrake', 5):.3f}")
    # Server CPU per request: steadier than requests/s when the server's core is shared.
    cpu = {t: statistics.median(float(r[8]) * 1e4 / float(r[3]) for r in rows
                                if r[0] == load and r[2] == t and float(r[3]) > 0)
           for t in ("passthrough", "keybrake")}
    print(f"{'':10} server CPU per request: passthrough {cpu['passthrough']:.1f} us, keybrake "
          f"{cpu['keybrake']:.1f} us -> ratio {cpu['passthrough'] / cpu['keybrake']:.3f}")
PY
