#!/usr/bin/env bash
# Allocations per login: runs bench.sh's idle step (N clients log in with
# SCRAM, run one query and stay) with pgferry under heaptrack, then prints
# pgferry's allocation calls divided by N, in total and by call site. Counts,
# not time. BENCHMARKS.md (session 13) quotes it.
#
# Usage (root, like bench.sh): loadtest/login-allocs.sh
# Environment: N=2000 (clients), SITES=30 (call sites shown), PGFERRY_BIN
# (default target/release/pgferry). Needs Debian's heaptrack.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=login-allocs
# shellcheck source=loadtest/heaptrack-wrap.sh
. "$REPO/loadtest/heaptrack-wrap.sh"
N=${N:-2000}
TARGETS=pgferry CLIENTS="" WORKLOADS="" PGBENCH_MODES="" IDLE_CLIENTS=$N HOLD=3 \
    PGFERRY_BIN="$DIR/pgferry" RESULTS="$DIR/bench.txt" "$REPO/loadtest/bench.sh" >"$DIR/bench.out" 2>&1
for _ in $(seq 100); do [ -s "$DIR/trace.zst" ] && ! pgrep -f "$DIR/pgferry-real" >/dev/null && break; sleep 0.2; done
echo "# $N SCRAM logins (one query each) through pgferry ($BIN)"
{
    heaptrack_print -f "$DIR/trace.zst" -m 0 --print-peaks 0 --print-allocators 1 --print-temporary 0 \
        --print-leaks 0 --peak-limit "${SITES:-30}" 2>/dev/null
    heaptrack_print -f "$DIR/trace.zst" 2>/dev/null | grep -E "^calls to allocation functions:"
} | awk -v n="$N" '
    function num(s,   v) { v = s + 0; if (s ~ /K$/) v *= 1e3; else if (s ~ /M$/) v *= 1e6; else if (s ~ /G$/) v *= 1e9; return v }
    /^calls to allocation functions:/ { printf "all sites: %.2f allocations per login\n", $5 / n; next }
    / calls to allocation functions with / { if (hdr != "") print hdr; hdr = sprintf("%7.2f/login:", num($1) / n); k = 0; next }
    /at (proxy|pool|protocol|tls|routing|config)\/src/ && k < 3 { hdr = hdr " " $2; k++ }
    END { if (hdr != "") print hdr }'
rm -rf "$DIR"
