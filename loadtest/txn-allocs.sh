#!/usr/bin/env bash
# Allocations per transaction: runs one pgbench mode through pgferry under
# heaptrack (bench.sh does the setup), then prints pgferry's allocation calls
# divided by pgbench's transactions, in total and by call site. Counts, not
# time: heaptrack slows pgferry down, the calls per transaction stay.
# BENCHMARKS.md quotes it.
#
# Usage (root, like bench.sh): loadtest/txn-allocs.sh
# Environment: MODE=simple (a bench.sh PGBENCH_MODES word: simple, extended,
# prepared, tpcb), CLIENTS=16, DURATION=10, SITES=15 (call sites shown),
# PGFERRY_BIN (default target/release/pgferry). Needs Debian's heaptrack.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=txn-allocs
# shellcheck source=loadtest/heaptrack-wrap.sh
. "$REPO/loadtest/heaptrack-wrap.sh"
TARGETS=pgferry CLIENTS=${CLIENTS:-16} WORKLOADS="" PGBENCH_MODES=${MODE:-simple} IDLE_CLIENTS=0 \
    DURATION=${DURATION:-10} PGFERRY_BIN="$DIR/pgferry" RESULTS="$DIR/bench.txt" \
    "$REPO/loadtest/bench.sh" >"$DIR/bench.out" 2>&1
wait_for_trace
txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$DIR/bench.txt" | head -1)
[ -n "$txns" ] && [ "$txns" -gt 0 ] || { echo "txn-allocs.sh: no pgbench result (see $DIR)" >&2; exit 1; }
echo "# pgbench -M ${MODE:-simple}, ${CLIENTS:-16} clients: $txns transactions through pgferry ($BIN)"
allocs_per transaction "$txns" "${SITES:-15}" 2
rm -rf "$DIR"
