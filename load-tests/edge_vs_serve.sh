#!/usr/bin/env bash
# The metered Stripe POST on an edge node vs on `serve` (target: within 10%), in one
# session: load-tests/proxy_overhead.sh run alternately with KB_MODE=serve and KB_MODE=edge,
# RUNS times each (one saturation round per run, no paced or light phase), each run with
# its own passthrough as the yardstick. Prints every run and the medians of keybrake
# requests/s, p99 and keybrake/passthrough ratio per mode, then edge/serve.
#
#   cargo build --release --bin keybrake --example passthrough
#   load-tests/edge_vs_serve.sh
#
# Env knobs: RUNS (3), and any of proxy_overhead.sh's (DURATION, CONNS, KB_THREADS, PIN…).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
RUNS=${RUNS:-3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq 1 "$RUNS"); do
  for mode in serve edge; do
    f="$out/$mode.$i.txt"
    ROUNDS=1 PACED_CONNS=0 LIGHT_CONNS=0 KB_MODE=$mode "$here/proxy_overhead.sh" >"$f" 2>&1 ||
      { tail -30 "$f" >&2; echo "FAIL: $mode run $i" >&2; exit 1; }
    echo "$mode run $i: $(grep -E '^requests/s|^p99 latency|^throughput ratio|^spend:' "$f" | tr -s ' ' | paste -sd';')"
  done
done
python3 - "$out" "$RUNS" <<'PY'
import re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def nums(mode):
    rps, p99, ratio = [], [], []
    for i in range(1, runs + 1):
        t = open(f"{out}/{mode}.{i}.txt").read()
        rps.append(float(re.search(r"^requests/s\s+[\d,]+\s+([\d,]+)", t, re.M).group(1).replace(",", "")))
        p99.append(float(re.search(r"^p99 latency ms\s+[\d.]+\s+([\d.]+)", t, re.M).group(1)))
        ratio.append(float(re.search(r"throughput ratio keybrake/passthrough: ([\d.]+)", t).group(1)))
    return statistics.median(rps), statistics.median(p99), statistics.median(ratio)
s, e = nums("serve"), nums("edge")
print(f"\n=== medians over {runs} runs each (alternating)")
print(f"serve: {s[0]:,.0f} req/s, p99 {s[1]:.3f} ms, keybrake/passthrough {s[2]:.3f}")
print(f"edge:  {e[0]:,.0f} req/s, p99 {e[1]:.3f} ms, keybrake/passthrough {e[2]:.3f}")
print(f"edge/serve: requests/s {e[0] / s[0]:.3f}, passthrough-normalised {e[2] / s[2]:.3f}, "
      f"p99 {e[1] / s[1]:.3f}")
PY
