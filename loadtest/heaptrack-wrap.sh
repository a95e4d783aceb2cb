# Sourced by idle-heaptrack.sh and txn-allocs.sh: checks for heaptrack, copies
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
