#!/usr/bin/env bash
# Where pgferry's CPU goes under load: runs one bench.sh workload against
# pgferry alone and records pgferry with `perf` for SECONDS seconds in the
# middle of it, then prints the top symbols (self time). BENCHMARKS.md quotes it.
#
# Usage (root, like bench.sh): loadtest/profile.sh
# Environment: WORKLOAD=select-simple CLIENTS=16 SECONDS_=8 TOP=25, PGFERRY_BIN,
# EVENT=cpu-clock (cpu-clock:u: user space only, the proxy's own code),
# PGBENCH_MODE (e.g. tpcb: profile under pgbench instead of pgferry-loadtest),
# CALLGRAPH=dwarf (record call graphs and also print inclusive time per symbol,
# "children", and who calls CALLERS_OF, default malloc; FREQ samples per second, default 499),
# KEEP=dir (copy perf.data there for further `perf report -i`).
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
if [ -n "${CALLGRAPH:-}" ]; then
    perf record -e "${EVENT:-cpu-clock}" -F "${FREQ:-499}" --call-graph "$CALLGRAPH" -p "$pid" -o "$DIR/perf.data" \
        -- sleep "${SECONDS_:-8}" 2>/dev/null >/dev/null
else
    perf record -e "${EVENT:-cpu-clock}" -F 1999 -g -p "$pid" -o "$DIR/perf.data" -- sleep "${SECONDS_:-8}" 2>/dev/null >/dev/null
fi
wait "$bench" || true
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$DIR/perf.data" "$KEEP/"; fi
# `head` closes the pipe early: not a failure.
perf report -i "$DIR/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
    grep -E '^ +[0-9.]+%' | head -"${TOP:-25}" | sed 's/ *- *- *$//' || true
if [ -n "${CALLGRAPH:-}" ]; then
    echo "# inclusive (self + callees)"
    perf report -i "$DIR/perf.data" --children --sort symbol --stdio -g none 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -"${TOP:-25}" | cut -c1-150 || true
    echo "# callers of ${CALLERS_OF:-malloc}"
    perf report -i "$DIR/perf.data" --no-children --sort symbol --stdio -G -S "${CALLERS_OF:-malloc}" \
        --percent-limit 0.2 2>/dev/null | grep -v '^$' | head -120 || true
fi
rm -rf "$DIR"
