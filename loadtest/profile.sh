#!/usr/bin/env bash
# Where pgferry's CPU goes under load: runs one bench.sh workload against
# pgferry alone and records pgferry with `perf` for SECONDS seconds in the
# middle of it, then prints the top symbols (self time). BENCHMARKS.md quotes it.
#
# Usage (root, like bench.sh): loadtest/profile.sh
# Environment: WORKLOAD=select-simple CLIENTS=16 SECONDS_=8 TOP=25, PGFERRY_BIN,
# EVENT=cpu-clock (cpu-clock:u: user space only, the proxy's own code),
# PGBENCH_MODE (e.g. tpcb: profile under pgbench instead of pgferry-loadtest).
# Needs Debian's linux-perf package.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v perf >/dev/null || { echo "profile.sh: apt-get install linux-perf" >&2; exit 1; }
DIR=$(mktemp -d /tmp/pgferry-profile.XXXXXX)
if [ -n "${PGBENCH_MODE:-}" ]; then
    WORKLOAD= marker="^## pgbench"
else
    WORKLOAD=${WORKLOAD:-select-simple} marker="^## pgferry-loadtest"
fi
TARGETS=pgferry CLIENTS=${CLIENTS:-16} WORKLOADS=$WORKLOAD PGBENCH_MODES=${PGBENCH_MODE:-} IDLE_CLIENTS=0 \
    DURATION=$(( ${SECONDS_:-8} + 12 )) WARMUP=2 ROUNDS=1 RESULTS="$DIR/bench.txt" \
    "$REPO/loadtest/bench.sh" >"$DIR/bench.out" 2>&1 &
bench=$!
for _ in $(seq 600); do grep -q "$marker" "$DIR/bench.txt" 2>/dev/null && break; sleep 0.2; done
sleep 5 # past connection setup and warm-up
pid=$(pgrep -f "/pgferry --config" | head -1)
echo "# workload ${WORKLOAD:-pgbench $PGBENCH_MODE}, ${CLIENTS:-16} clients; pgferry pid $pid, ${SECONDS_:-8} s of samples"
perf record -e "${EVENT:-cpu-clock}" -F 1999 -g -p "$pid" -o "$DIR/perf.data" -- sleep "${SECONDS_:-8}" 2>/dev/null >/dev/null
wait "$bench" || true
perf report -i "$DIR/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
    grep -E '^ +[0-9.]+%' | head -"${TOP:-25}" | sed 's/ *- *- *$//'
rm -rf "$DIR"
