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
wait_for_trace
echo "# $N SCRAM logins (one query each) through pgferry ($BIN)"
allocs_per login "$N" "${SITES:-30}" 3
rm -rf "$DIR"
