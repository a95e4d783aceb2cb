#!/usr/bin/env bash
# Where pgferry's memory per idle client goes: runs bench.sh's idle step
# (IDLE_CLIENTS clients log in, run one query and stay connected) with pgferry
# under heaptrack, then prints the largest live allocations at the peak by call
# site, with the average size of one allocation (heaptrack's K/M are 1000s).
# BENCHMARKS.md quotes it.
#
# Usage (root, like bench.sh): loadtest/idle-heaptrack.sh
# Environment: IDLE_CLIENTS=10000, PGFERRY_BIN (default target/release/pgferry),
# PEAKS=14 (call sites shown). Needs Debian's heaptrack package.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=idle-heaptrack
# shellcheck source=loadtest/heaptrack-wrap.sh
. "$REPO/loadtest/heaptrack-wrap.sh"
TARGETS=pgferry CLIENTS="" WORKLOADS="" PGBENCH_MODES="" IDLE_CLIENTS=${IDLE_CLIENTS:-10000} HOLD=5 \
    PGFERRY_BIN="$DIR/pgferry" RESULTS="$DIR/bench.txt" "$REPO/loadtest/bench.sh" >"$DIR/bench.out" 2>&1
for _ in $(seq 50); do [ -s "$DIR/trace.zst" ] && ! pgrep -f "$DIR/pgferry-real" >/dev/null && break; sleep 0.2; done
echo "# idle clients: ${IDLE_CLIENTS:-10000}; pgferry: $BIN"
echo "# peak consumers (unmerged backtraces): total, calls, average per call, first pgferry frames"
heaptrack_print -f "$DIR/trace.zst" -m 0 --print-peaks 1 --print-allocators 0 --print-temporary 0 \
    --print-leaks 0 --peak-limit "${PEAKS:-14}" 2>/dev/null | awk '
    function bytes(s,   n) { n = s + 0; if (s ~ /K$/) n *= 1e3; else if (s ~ /M$/) n *= 1e6; else if (s ~ /G$/) n *= 1e9; return n }
    /peak memory consumed over/ { if (hdr != "") print hdr; hdr = sprintf("%9s %7s calls  %6.0f B each:", $1, $6, bytes($1) / $6); n = 0; next }
    /at (proxy|pool|protocol|tls|routing|config)\/src/ && n < 2 { hdr = hdr " " $2; n++ }
    END { if (hdr != "") print hdr }'
rm -rf "$DIR"
