# Sourced by idle-heaptrack.sh, login-allocs.sh and txn-allocs.sh: checks for heaptrack, copies
# pgferry into a fresh $DIR and writes $DIR/pgferry, a wrapper bench.sh can
# start as its pgferry. heaptrack writes its data only when the program exits,
# so the wrapper turns bench.sh's SIGTERM into SIGINT (pgferry exits at once);
# the trace is $DIR/trace.zst. Needs NAME (the caller's name) and REPO.
command -v heaptrack >/dev/null && command -v heaptrack_print >/dev/null ||
    { echo "$NAME: apt-get install heaptrack" >&2; exit 1; }
BIN=${PGFERRY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/pgferry}
[ -x "$BIN" ] || (cd "$REPO" && cargo build --release -p pgferry-proxy)
DIR=$(mktemp -d "/tmp/pgferry-$NAME.XXXXXX")
chmod 777 "$DIR" # bench.sh runs pgferry as an unprivileged user
cp "$BIN" "$DIR/pgferry-real"
cat >"$DIR/pgferry" <<WRAP
#!/usr/bin/env bash
heaptrack -o $DIR/trace $DIR/pgferry-real "\$@" &
trap 'pkill -INT -f "$DIR/pgferry-real"; wait \$!; exit 0' TERM INT
wait \$!
WRAP
chmod 755 "$DIR/pgferry" "$DIR/pgferry-real"

# Waits for the trace of the run that just ended (heaptrack writes it as
# pgferry exits).
wait_for_trace() {
    for _ in $(seq 100); do
        [ -s "$DIR/trace.zst" ] && ! pgrep -f "$DIR/pgferry-real" >/dev/null && break
        sleep 0.2
    done
}

# Prints pgferry's allocation calls divided by COUNT, in all and by call
# site (SITES sites, each named by its first FRAMES frames in pgferry's own
# code). Usage: allocs_per UNIT COUNT SITES FRAMES, e.g. allocs_per login 2000 30 3.
allocs_per() {
    local unit=$1 count=$2 sites=$3 frames=$4
    # One pass over the trace: its summary ends with the total of calls.
    heaptrack_print -f "$DIR/trace.zst" -m 0 --print-peaks 0 --print-allocators 1 --print-temporary 0 \
        --print-leaks 0 --peak-limit "$sites" 2>/dev/null |
        awk -v n="$count" -v unit="$unit" -v frames="$frames" '
        function num(s,   v) { v = s + 0; if (s ~ /K$/) v *= 1e3; else if (s ~ /M$/) v *= 1e6; else if (s ~ /G$/) v *= 1e9; return v }
        /^calls to allocation functions:/ && !total++ { if (hdr != "") print hdr; hdr = ""; printf "all sites: %.2f allocations per %s\n", $5 / n, unit; next }
        / calls to allocation functions with / { if (hdr != "") print hdr; hdr = sprintf("%7.2f/%s:", num($1) / n, unit); k = 0; next }
        /at (proxy|pool|protocol|tls|routing|config)\/src/ && k < frames { hdr = hdr " " $2; k++ }
        END { if (hdr != "") print hdr }'
}
