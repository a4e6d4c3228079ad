#!/usr/bin/env bash
# RSS of the proxy's key state at fleet scale: the verified-token cache holding KEYS
# (1,000,000) distinct live vault keys and the revocation filter holding REVOKED (100,000)
# ids, built by examples/token_cache_rss.rs in one process the way `serve` and an edge
# node build them (tokens minted there with a fresh signing key, each verified once).
# Prints the RSS and fails above LIMIT_MIB (256).
#
#   cargo build --release --example token_cache_rss
#   load-tests/token_cache_rss.sh
#
# Env knobs: KEYS  REVOKED  CACHE_ENTRIES (the token_cache_entries bound, 1048576)
# THREADS (minting threads, 2)  LIMIT_MIB (256).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BIN="$KB_ROOT/target/release/examples/token_cache_rss"
need_bin "$BIN" "cargo build --release --example token_cache_rss"
LIMIT_MIB=${LIMIT_MIB:-256}
"$BIN" --keys "${KEYS:-1000000}" --revoked "${REVOKED:-100000}" \
  --cache-entries "${CACHE_ENTRIES:-1048576}" --threads "${THREADS:-2}" | tee "$TMP/out.txt"
rss=$(sed -n 's/^RSS_MIB=//p' "$TMP/out.txt")
python3 -c "import sys; r, l = float(sys.argv[1]), float(sys.argv[2]); print(f'RSS {r:.1f} MiB (limit {l:.0f} MiB): ' + ('OK' if r < l else 'ABOVE')); sys.exit(r >= l)" "$rss" "$LIMIT_MIB"
