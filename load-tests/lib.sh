# Shared helpers for the load tests (sourced, not run): free ports, CPU pinning, a local
# nginx upstream, starting `keybrake serve`, control-API setup calls, parsing wrk output.
# Everything binds 127.0.0.1; every process started here is stopped on exit, and the
# temporary directory is removed (set KEEP_TMP=1 to keep it for inspection).

KB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KB_BIN="${KB_BIN:-$KB_ROOT/target/release/keybrake}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/keybrake-load.XXXXXX")"
PIDS=()

WRK_PID=
cleanup() {
  local p alive
  [ -n "$WRK_PID" ] && kill -TERM "$WRK_PID" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done   # Pingora: SIGINT = fast shutdown
  for _ in $(seq 1 50); do                                                # at most 5 s, then SIGKILL
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
  echo "FAIL: $*" >&2
  if [ -n "${KB_PID:-}" ]; then
    if kill -0 "$KB_PID" 2>/dev/null; then echo "(keybrake, pid $KB_PID, is running)" >&2
    else local st=0; wait "$KB_PID" 2>/dev/null || st=$?; echo "(keybrake, pid $KB_PID, has exited with status $st)" >&2; fi
    echo "--- keybrake stderr (tail)" >&2; tail -20 "$TMP/keybrake.err" >&2 2>/dev/null || true
  fi
  exit 1
}

need() { # command [apt package]
  command -v "$1" >/dev/null && return
  echo "installing $1 ..." >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq "${2:-$1}" >/dev/null
  else sudo apt-get install -y -qq "${2:-$1}" >/dev/null; fi
}

need_bin() { # path hint
  [ -x "$1" ] || die "missing $1 — build it first: $2"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # url [seconds]
  for _ in $(seq 1 $(( ${2:-30} * 10 ))); do
    curl -fs -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2; return 1
}

json_field() { python3 -c "import sys,json; print(json.load(sys.stdin)[\"$1\"])"; }

# ---- CPU pinning ---------------------------------------------------------------------
# The server under test (keybrake / passthrough) runs on SERVER_CPUS, the load generator
# (wrk) and the upstream (nginx) on LOAD_CPUS, so the proxy is not starved by the tools
# measuring it. Default on a machine with >= 2 CPUs: the last CPU for load, the rest for
# the server. PIN=0 disables pinning.
NCPU=$(nproc)
if [ "${PIN:-1}" = 1 ] && [ "$NCPU" -ge 2 ] && command -v taskset >/dev/null; then
  LOAD_CPUS=${LOAD_CPUS:-$((NCPU - 1))}
  if [ "$NCPU" = 2 ]; then SERVER_CPUS=${SERVER_CPUS:-0}; else SERVER_CPUS=${SERVER_CPUS:-0-$((NCPU - 2))}; fi
  ON_SERVER=(taskset -c "$SERVER_CPUS")
  ON_LOAD=(taskset -c "$LOAD_CPUS")
  PIN_DESC="server under test on CPU $SERVER_CPUS, wrk + upstream on CPU $LOAD_CPUS"
else
  ON_SERVER=()
  ON_LOAD=()
  SERVER_CPUS=""; LOAD_CPUS=""
  PIN_DESC="no CPU pinning"
fi
# Prefix a command with "${ON_SERVER[@]}" / "${ON_LOAD[@]}" (an array, not a function, so
# that `$!` of a background start is the server's own PID: taskset execs it).

# cpu_ticks PID -> user+system clock ticks used so far by the process (all threads)
# (fields after the "(comm)", which may contain spaces: utime and stime are the 12th, 13th)
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0; }
# cpu_sys_ticks PID -> the system (kernel) part of cpu_ticks
cpu_sys_ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $13}' || echo 0; }
CLK_TCK=$(getconf CLK_TCK)
# cpu_busy CPULIST -> busy clock ticks (all processes) so far on those CPUs ("" = all CPUs)
cpu_busy() {
  python3 - "$1" <<'PY'
import sys
want = set()
for part in filter(None, sys.argv[1].split(",")):
    a, _, b = part.partition("-")
    want.update(range(int(a), int(b or a) + 1))
busy = 0
for line in open("/proc/stat"):
    f = line.split()
    if not f[0].startswith("cpu") or f[0] == "cpu":
        continue
    if want and int(f[0][3:]) not in want:
        continue
    v = list(map(int, f[1:9]))        # user nice system idle iowait irq softirq steal
    busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
print(busy)
PY
}

# ---- local upstream: nginx answering a fixed Stripe-like PaymentIntent ------------------
# start_nginx PORT -> private config and prefix under $TMP/nginx, loopback only, 1 worker.
start_nginx() {
  need nginx
  local dir="$TMP/nginx"
  mkdir -p "$dir/logs" "$dir/tmp"
  cat > "$dir/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {
    listen 127.0.0.1:$1 reuseport;
    default_type application/json;
    location / {
      add_header Request-Id req_load always;
      return 200 '{"id":"pi_1","object":"payment_intent","amount":100,"currency":"usd","status":"succeeded"}';
    }
  }
}
NGINX
  "${ON_LOAD[@]}" nginx -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" >"$dir/logs/stdout.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$1/v1/payment_intents" 10 || { cat "$dir/logs/error.log" >&2; die "nginx did not start"; }
}

# ---- keybrake -------------------------------------------------------------------------
# start_keybrake UPSTREAM_URL -> sets KB_PID, KB_PROXY, KB_CONTROL, KB_METRICS, KB_ADMIN
# Env: KB_THREADS (Pingora worker threads, default 2), ACCESS_LOG (default a file in $TMP;
# "off" to disable), KB_EXTRA_YAML (more config lines, e.g. a proxy: section),
# KB_DATABASE_URL (set: `keybrake control --database-url` on PostgreSQL instead of `serve`;
# see with_postgres).
start_keybrake() {
  local proxy control metrics
  if [ -n "${KB_DATABASE_URL:-}" ]; then KB_STORE_ARGS=(control --database-url "$KB_DATABASE_URL")
  else KB_STORE_ARGS=(serve --data-dir "$TMP/data"); fi
  proxy=$(free_port); control=$(free_port); metrics=$(free_port)
  KB_ADMIN="admin-$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  cat > "$TMP/kb.yaml" <<YAML
vendors_file: $KB_ROOT/conf/vendors.yaml
currencies_file: $KB_ROOT/conf/currencies.yaml
access_log: ${ACCESS_LOG:-$TMP/access.log}
audit:
  durability: ${AUDIT_DURABILITY:-normal}
pingora:
  threads: ${KB_THREADS:-2}
  upgrade_sock: $TMP/upgrade.sock
  pid_file: $TMP/kb.pid
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
${KB_EXTRA_YAML:-}
YAML
  KEYBRAKE_ADMIN_TOKEN="$KB_ADMIN" KEYBRAKE_MASTER_KEY="$(head -c32 /dev/urandom | base64)" \
    "${ON_SERVER[@]}" "$KB_BIN" "${KB_STORE_ARGS[@]}" --config "$TMP/kb.yaml" \
      --proxy-listen "127.0.0.1:$proxy" --control-listen "127.0.0.1:$control" \
      --metrics-listen "127.0.0.1:$metrics" --vendor-upstream "stripe=$1" \
      >"$TMP/keybrake.out" 2>"$TMP/keybrake.err" &
  KB_PID=$!
  PIDS+=($KB_PID)
  KB_PROXY="127.0.0.1:$proxy"; KB_CONTROL="127.0.0.1:$control"; KB_METRICS="127.0.0.1:$metrics"
  wait_http "http://$KB_CONTROL/readyz" 30 || { tail -20 "$TMP/keybrake.err" >&2; die "keybrake did not become ready"; }
}

# start_keybrake_edge UPSTREAM_URL -> the fleet shape instead of `serve`: `keybrake control`
# (control API, SQLite in $TMP/data) and one edge node `keybrake proxy` synced from it, both
# with the same config (same Pingora threads for the node as for serve) and pinned like
# serve. Sets the same KB_* as start_keybrake (KB_PROXY is the node's, KB_METRICS the
# node's) plus KB_CONTROL_PID and KB_NODE_PID.
start_keybrake_edge() {
  local proxy control metrics cmetrics
  proxy=$(free_port); control=$(free_port); metrics=$(free_port); cmetrics=$(free_port)
  KB_ADMIN="admin-$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  cat > "$TMP/kb.yaml" <<YAML
vendors_file: $KB_ROOT/conf/vendors.yaml
currencies_file: $KB_ROOT/conf/currencies.yaml
access_log: ${ACCESS_LOG:-$TMP/access.log}
audit:
  durability: ${AUDIT_DURABILITY:-normal}
pingora:
  threads: ${KB_THREADS:-2}
  upgrade_sock: $TMP/upgrade.sock
  pid_file: $TMP/kb.pid
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
${KB_EXTRA_YAML:-}
YAML
  # CONTROL_CPUS: where the control plane runs (default: the server CPUs, beside the node;
  # in a fleet it has a host of its own, which CONTROL_CPUS=$LOAD_CPUS comes closer to).
  local on_control=("${ON_SERVER[@]}")
  [ -n "${CONTROL_CPUS:-}" ] && [ -n "${SERVER_CPUS:-}" ] && on_control=(taskset -c "$CONTROL_CPUS")
  KEYBRAKE_ADMIN_TOKEN="$KB_ADMIN" KEYBRAKE_MASTER_KEY="$(head -c32 /dev/urandom | base64)" \
    "${on_control[@]}" "$KB_BIN" control --config "$TMP/kb.yaml" --data-dir "$TMP/data" \
      --control-listen "127.0.0.1:$control" --metrics-listen "127.0.0.1:$cmetrics" \
      >"$TMP/control.out" 2>"$TMP/control.err" &
  KB_CONTROL_PID=$!
  PIDS+=($KB_CONTROL_PID)
  KB_CONTROL="127.0.0.1:$control"
  wait_http "http://$KB_CONTROL/readyz" 30 || { tail -20 "$TMP/control.err" >&2; die "keybrake control did not become ready"; }
  control POST /v1/nodes "$KB_ADMIN" '{"name":"load-edge"}' | json_field node_token >"$TMP/node.token"
  chmod 600 "$TMP/node.token"
  "${ON_SERVER[@]}" "$KB_BIN" proxy --config "$TMP/kb.yaml" --control-url "http://$KB_CONTROL" \
      --node-token-file "$TMP/node.token" --proxy-listen "127.0.0.1:$proxy" \
      --metrics-listen "127.0.0.1:$metrics" --vendor-upstream "stripe=$1" \
      >"$TMP/node.out" 2>"$TMP/node.err" &
  KB_NODE_PID=$!
  KB_PID=$KB_NODE_PID
  PIDS+=($KB_NODE_PID)
  KB_PROXY="127.0.0.1:$proxy"; KB_METRICS="127.0.0.1:$metrics"
  wait_http "http://$KB_METRICS/readyz" 30 || { tail -20 "$TMP/node.err" >&2; die "the edge node did not become ready"; }
}

# start_by_mode -> wrk and curl installed if missing, nginx as the upstream, keybrake
# `serve` (KB_MODE=serve, the default) or an edge node and its control plane (KB_MODE=edge)
# in front of it, and a tenant with a Stripe credential (KB_TENANT_TOKEN)
start_by_mode() {
  local up
  need wrk
  need curl
  need_bin "$KB_BIN" "cargo build --release --bin keybrake"
  up=$(free_port)
  start_nginx "$up"
  case "${KB_MODE:-serve}" in
    serve) start_keybrake "http://127.0.0.1:$up" ;;
    edge) start_keybrake_edge "http://127.0.0.1:$up" ;;
    *) die "KB_MODE must be serve or edge" ;;
  esac
  new_tenant
}

# metric NAME -> the proxy's (serve's or the edge node's) counter (0 when absent)
metric() { curl -fsS --max-time 5 "http://$KB_METRICS/metrics" | awk -v n="$1" '$1 == n {print $2; f=1} END {if (!f) print 0}'; }

# with_postgres "$@" -> when BACKEND=postgres, runs this script again inside a throwaway
# PostgreSQL cluster (tests/acceptance/pg.py: initdb in a temporary directory, as the
# `postgres` user when root, removed afterwards) with KB_DATABASE_URL set to a fresh
# database. The cluster runs on the server's CPUs (SERVER_CPUS), beside keybrake: the
# same CPU budget the embedded SQLite gets. PG_CPUS=LIST gives it other CPUs instead.
with_postgres() {
  [ "${BACKEND:-sqlite}" = postgres ] || return 0
  [ -n "${KB_DATABASE_URL:-}" ] && return 0
  cleanup
  trap - EXIT
  # The child script finds the database in KEYBRAKE_TEST_DATABASE_URL; pg.py starts the
  # server under `taskset -c $KEYBRAKE_PG_CPUS`.
  KEYBRAKE_PG_CPUS="${PG_CPUS:-$SERVER_CPUS}" exec python3 "$KB_ROOT/tests/acceptance/pg.py" run -- \
    env KB_PG_FROM_PARENT=1 BACKEND=postgres bash "$0" "$@"
}
if [ "${KB_PG_FROM_PARENT:-}" = 1 ] && [ -n "${KEYBRAKE_TEST_DATABASE_URL:-}" ]; then
  KB_DATABASE_URL="$KEYBRAKE_TEST_DATABASE_URL"
fi

# control METHOD PATH TOKEN [JSON] -> prints the body; fails loudly on a non-2xx answer
control() {
  local code args=(-sS -o "$TMP/control.body" -w '%{http_code}' --max-time 10 -X "$1" "http://$KB_CONTROL$2"
    -H "authorization: Bearer $3" -H 'content-type: application/json')
  [ $# -ge 4 ] && args+=(--data "$4")
  code=$(curl "${args[@]}") || die "$1 $2: curl failed"
  [[ "$code" == 2* ]] || die "$1 $2 -> HTTP $code: $(cat "$TMP/control.body")"
  cat "$TMP/control.body"
}

# new_tenant -> sets KB_TENANT_TOKEN, with a Stripe credential registered
# (on an edge node, once the node holds the credential: its snapshot version moved on)
new_tenant() {
  local v0=""
  [ -n "${KB_NODE_PID:-}" ] && v0=$(node_snapshot_version)
  KB_TENANT_TOKEN=$(control POST /v1/tenants "$KB_ADMIN" '{"name":"load"}' | json_field api_token)
  control PUT /v1/vendors/stripe/credential "$KB_TENANT_TOKEN" '{"secret":"sk_test_load"}' >/dev/null
  if [ -n "$v0" ]; then
    for _ in $(seq 1 50); do
      [ "$(node_snapshot_version)" -gt "$v0" ] && return 0
      sleep 0.1
    done
    die "the edge node did not pick up the new credential within 5 s"
  fi
}

node_snapshot_version() {
  curl -fsS --max-time 5 "http://$KB_METRICS/metrics" | awk '$1 == "keybrake_sync_snapshot_version" {print int($2)}'
}

# ---- wrk ------------------------------------------------------------------------------
# wrk_stats FILE -> "RPS P50_MS P99_MS NON2XX SOCKET_ERRORS REQUESTS"
wrk_stats() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def pct(p):
    m = re.search(r"^\s+%s(?:\.000)?%%\s+([\d.]+)(us|ms|s)\s*$" % p, text, re.M)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
reqs = int(re.search(r"(\d+) requests in", text).group(1))
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
print(f"{rps:.0f} {pct(50):.3f} {pct(99):.3f} {int(bad.group(1)) if bad else 0} "
      f"{sum(map(int, errs.groups())) if errs else 0} {reqs}")
PY
}

# run_wrk OUT_FILE PID_TO_WATCH CONNS SECONDS LUA URL -> wrk --latency output in OUT_FILE, plus
# OUT_FILE.cpu holding the CPU used by PID during the run (percent of one core), of which
# OUT_FILE.sys the kernel's (system time), and OUT_FILE.other the CPU used by anything
# else on the server's CPUs
run_wrk() {
  local t0 t1 s0 s1 b0 b1 k0 k1
  b0=$(cpu_busy "${SERVER_CPUS:-}"); t0=$(cpu_ticks "$2"); k0=$(cpu_sys_ticks "$2"); s0=$(date +%s.%N)
  # wrk runs in the background and the shell waits for it, so that a signal reaches the
  # trap at once instead of after the run (cleanup stops wrk too).
  "${ON_LOAD[@]}" wrk -t"${WRK_THREADS:-1}" -c"$3" -d"$4s" --timeout 5s --latency -s "$5" "$6" >"$1" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || { WRK_PID=; cat "$1" >&2; die "wrk failed against $6"; }
  WRK_PID=
  t1=$(cpu_ticks "$2"); k1=$(cpu_sys_ticks "$2"); b1=$(cpu_busy "${SERVER_CPUS:-}"); s1=$(date +%s.%N)
  python3 -c "print(f'{($t1 - $t0) / $CLK_TCK / ($s1 - $s0) * 100:.0f}')" >"$1.cpu"
  python3 -c "print(f'{($k1 - $k0) / $CLK_TCK / ($s1 - $s0) * 100:.1f}')" >"$1.sys"
  # CPU used on the server's CPUs by everything else (other processes, wrk/nginx when not
  # pinned): a run where this is high was disturbed.
  python3 -c "print(f'{max(0, ($b1 - $b0) - ($t1 - $t0)) / $CLK_TCK / ($s1 - $s0) * 100:.0f}')" >"$1.other"
}

# wrk script for the metered Stripe call both proxy scripts send: POST, form body $2,
# vault key $3.
write_post_lua() { # file body vault-key
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = "$2"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Bearer $3"
LUA
}
