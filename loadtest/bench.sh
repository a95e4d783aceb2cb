#!/usr/bin/env bash
# pgferry benchmark driver: one run on one machine, everything on loopback.
#
# Starts a throwaway PostgreSQL 15 (pgbench -i), PgBouncer (transaction mode)
# and pgferry, then measures direct / pgbouncer / pgferry with
# pgferry-loadtest and with pgbench, and the memory of 10,000 idle clients.
# Every command is echoed ("+ ...") into the results file with its raw output.
# Everything started here is stopped on exit.
#
# Must run as root (the servers run as the unprivileged $RUN_AS user).
# Settings (environment):
#   POOL=20                 server connections per pool (pgbouncer and pgferry)
#   SCALE=10                pgbench -i scale
#   CLIENTS="16 100 1000"   client counts ("" = no throughput runs, e.g. idle only)
#   WORKLOADS="select-simple select-extended select-prepared write"  ("" = none)
#   PGBENCH_MODES="simple extended prepared"   pgbench -S -M modes ("" = skip pgbench);
#                           "tpcb" adds pgbench's default TPC-B-like script (-M simple)
#   SYSCALLS=0              1: count each proxy's system calls, context switches and
#                           CPU migrations per pgbench transaction (perf stat on its
#                           pid for the run; needs linux-perf): syscalls=, cs=, migr=
#   DURATION=10 WARMUP=2 ROUNDS=3              seconds / rounds per measurement
#   IDLE_CLIENTS=10000 HOLD=10                 idle-memory test ("0" = skip)
#   IDLE_AFTER              seconds after the idle clients closed to read RSS again
#                           (memory given back; "" = not measured)
#   MAX_CONNECTIONS=300     PostgreSQL max_connections; the direct target is
#                           skipped for client counts it cannot take
#   TARGETS="direct pgbouncer pgferry"         which targets to measure
#   RATE=0                  loadtest workloads run open loop at RATE transactions
#                           per second per client (0 = closed loop, as fast as
#                           each client can); with RATE latency counts from the
#                           scheduled start. 10,000 clients at 1/s:
#                           CLIENTS=10000 RATE=1 WORKLOADS=select-simple PGBENCH_MODES=""
#   SOAK=0                  seconds of a soak after everything else (0 = none):
#                           SOAK_CLIENTS=10000 connections to each SOAK_TARGETS
#                           (default pgferry), SOAK_ACTIVE=0.2 of them at RATE (default
#                           1) transactions per second, the rest idle, SOAK_RECONNECT=0.01
#                           of the connections replaced per second, sampled every
#                           SOAK_SAMPLE=30 s after SOAK_WARMUP=300 s of warm-up; fails
#                           on any error, RSS growth over 5% or descriptor growth
#   RESULTS=loadtest/results/bench-<utc time>.txt
#   PGFERRY_BIN             default: ${CARGO_TARGET_DIR:-target}/release/pgferry
#                           (built with cargo build --release -p pgferry-proxy if missing)
#   LOADTEST_BIN            default: ${CARGO_TARGET_DIR:-target}/release/pgferry-loadtest
#   PGFERRY_BASE_BIN        a second pgferry binary (e.g. an older commit's build),
#                           measured as target "pgferry-base" beside "pgferry" in the
#                           same run: A/B of two versions with the same config
#   PG_BIN=/usr/lib/postgresql/15/bin  PGBOUNCER=/usr/sbin/pgbouncer  RUN_AS=postgres
#   PGFERRY_WORKERS=0       pgferry's [runtime] worker_threads (0 = one per core)
#   PGFERRY_SCHEDULER       pgferry's [runtime] scheduler: thread-per-core or work-stealing
#   PGFERRY_PARK            pgferry's [runtime] park_idle_after (e.g. 0s: no parking;
#                           default: pgferry's own), PGFERRY_BASE_PARK pgferry-base's
#                           ("" = the binary's default, which a binary older than the setting needs);
#                           PGFERRY_BASE_SCHEDULER: pgferry-base's (default PGFERRY_SCHEDULER)
#   PGFERRY_BASE_WORKERS    worker_threads of "pgferry-base" (default PGFERRY_WORKERS):
#                           with PGFERRY_BASE_BIN set to the same binary, an A/B of
#                           runtime shapes in one run
#   PGFERRY_ENV, PGFERRY_BASE_ENV  extra NAME=VALUE environment of pgferry / pgferry-base
#   KEEP_TMP=1              keep the temporary directory (data, configs, logs)
#   CONNECT_CLIENTS=""      client counts for the connect workload (connect,
#                           authenticate, SELECT 1, Terminate per transaction);
#                           "" = skip
#   CONNECT_TARGETS=$TARGETS  targets of the connect workload
#   TOKIO_RELAY_THREADS=1   target "tokio-relay" (add it to TARGETS): loadtest's
#                           tokio-relay binary, a Tokio TCP relay that parses and
#                           pools nothing (the floor of a Tokio proxy); 1 thread is
#                           a current-thread runtime, more a multi-thread one
#   HAPROXY=/usr/sbin/haproxy  target "haproxy" (add it to TARGETS): HAProxy in
#                           TCP mode in front of PostgreSQL, one server
#                           connection per client and no protocol parsing: what
#                           the leanest relay costs on this machine, a floor
#                           for any proxy's overhead
#
# TLS mode (TLS=1, issue 3): a self-signed certificate is made with openssl and
# a second PgBouncer and a second pgferry are started with it, client TLS
# required (targets pgbouncer-tls and pgferry-tls; same pools, SCRAM as well),
# so TLS and plain run side by side in one loadtest invocation with alternating
# rounds, and each process's CPU time is its own. The defaults change to
#   TARGETS="pgbouncer pgbouncer-tls pgferry pgferry-tls" CLIENTS="16 100"
#   WORKLOADS="select-simple select-extended" PGBENCH_MODES="" IDLE_CLIENTS=0
#   CONNECT_CLIENTS="16 64"
# and any of them can still be set. Further settings:
#   TLS_KEY=ec              certificate key: ec (P-256) or rsa (2048 bits)
#   TLS_GROUPS=""           key-exchange groups the generator offers
#                           (pgferry-loadtest --tls-groups, e.g. X25519)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TLS=${TLS:-0}
TLS_KEY=${TLS_KEY:-ec}
TLS_GROUPS=${TLS_GROUPS:-}
if [ "$TLS" = 1 ]; then
    TARGETS=${TARGETS:-"pgbouncer pgbouncer-tls pgferry pgferry-tls"}
    CLIENTS=${CLIENTS-"16 100"}
    WORKLOADS=${WORKLOADS-"select-simple select-extended"}
    PGBENCH_MODES=${PGBENCH_MODES-""}
    IDLE_CLIENTS=${IDLE_CLIENTS:-0}
    CONNECT_CLIENTS=${CONNECT_CLIENTS-"16 64"}
fi
CONNECT_CLIENTS=${CONNECT_CLIENTS-""}
POOL=${POOL:-20}
PGFERRY_WORKERS=${PGFERRY_WORKERS:-0}
PGFERRY_SCHEDULER=${PGFERRY_SCHEDULER:-}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS-"16 100 1000"}
WORKLOADS=${WORKLOADS-"select-simple select-extended select-prepared write"}
PGBENCH_MODES=${PGBENCH_MODES-"simple extended prepared"}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
HOLD=${HOLD:-10}
MAX_CONNECTIONS=${MAX_CONNECTIONS:-300}
TARGETS=${TARGETS:-"direct pgbouncer pgferry"}
CONNECT_TARGETS=${CONNECT_TARGETS:-$TARGETS}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
RUN_AS=${RUN_AS:-postgres}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
BUILD_DIR=${CARGO_TARGET_DIR:-$REPO/target}
PGFERRY_BIN=${PGFERRY_BIN:-$BUILD_DIR/release/pgferry}
LOADTEST_BIN=${LOADTEST_BIN:-$BUILD_DIR/release/pgferry-loadtest}
RESULTS=${RESULTS:-$REPO/loadtest/results/bench-$(date -u +%Y%m%dT%H%M%SZ).txt}
BENCH_USER=bench
BENCH_PASSWORD=bench
BENCH_DB=bench

mkdir -p "$(dirname "$RESULTS")"
: >"$RESULTS"

log() { echo "$*" | tee -a "$RESULTS"; }
# Runs a command, echoing it and its output (stdout and stderr) into the results.
run() {
    log "+ $*"
    "$@" 2>&1 | tee -a "$RESULTS"
    return "${PIPESTATUS[0]}"
}
die() { log "bench.sh: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the servers are started as $RUN_AS)"
id "$RUN_AS" >/dev/null 2>&1 || die "no user $RUN_AS"
for b in "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$PG_BIN/pgbench" "$PG_BIN/psql" "$PGBOUNCER"; do
    [ -x "$b" ] || die "missing $b"
done
[ "$TLS" = 0 ] || command -v openssl >/dev/null || die "TLS=1 needs openssl"

# Clients are sockets: lift the open-files limit for everything started here.
ulimit -n "$(ulimit -Hn)"

TMP=$(mktemp -d /tmp/pgferry-bench.XXXXXX)
chown "$RUN_AS" "$TMP"
chmod 755 "$TMP"
PG_DATA=$TMP/pg
PGBOUNCER_PID=
PGFERRY_PID=
PGBOUNCER_TLS_PID=
PGFERRY_TLS_PID=
PGFERRY_BASE_PID=
HAPROXY_PID=
TOKIO_RELAY_PID=

# Stops process $1 (if set and alive): TERM, then KILL after 5 s.
stop_pid() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 0
    kill -TERM "$1"
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$1" 2>/dev/null
}

cleanup() {
    local rc=$?
    set +e
    stop_pid "$PGFERRY_PID"
    stop_pid "$PGFERRY_TLS_PID"
    stop_pid "$PGBOUNCER_PID"
    stop_pid "$PGBOUNCER_TLS_PID"
    stop_pid "$PGFERRY_BASE_PID"
    stop_pid "$HAPROXY_PID"
    stop_pid "$TOKIO_RELAY_PID"
    if [ -f "$PG_DATA/postmaster.pid" ]; then
        as_user "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ -n "${KEEP_TMP:-}" ]; then
        echo "bench.sh: kept $TMP"
    else
        rm -rf "$TMP"
    fi
    echo "bench.sh: results in $RESULTS"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prefix that runs a command as $RUN_AS by exec (no intermediate process,
# so `"${AS_USER[@]}" cmd &` leaves the command's own PID in $!), with this
# shell's limits.
AS_USER=(setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --init-groups --)
as_user() { "${AS_USER[@]}" "$@"; }

# A free TCP port below the ephemeral range.
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 12000))
        if [ -z "$(ss -Hltn "( sport = :$p )")" ] && ! grep -qw "$p" "$TMP/ports" 2>/dev/null; then
            echo "$p" >>"$TMP/ports"
            echo "$p"
            return 0
        fi
    done
    die "no free port"
}

# Waits until something accepts on 127.0.0.1:$1 (while process $2 lives).
wait_port() {
    for _ in $(seq 150); do
        if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then return 1; fi
        [ -n "$(ss -Hltn "( sport = :$1 )")" ] && return 0
        sleep 0.1
    done
    return 1
}

# utime+stime of a process, in clock ticks.
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# utime alone: the user-space share (the proxy's own code and runtime).
user_ticks() { awk '{ sub(/.*\) /, ""); print $12 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

log "# pgferry benchmark $(date -u +%FT%TZ) on $(uname -srm), $(nproc) cores, $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
log "# POOL=$POOL SCALE=$SCALE CLIENTS='$CLIENTS' WORKLOADS='$WORKLOADS' PGBENCH_MODES='$PGBENCH_MODES'"
log "# DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS IDLE_CLIENTS=$IDLE_CLIENTS HOLD=$HOLD MAX_CONNECTIONS=$MAX_CONNECTIONS"
log "# TARGETS='$TARGETS' CONNECT_CLIENTS='$CONNECT_CLIENTS' CONNECT_TARGETS='$CONNECT_TARGETS' TLS=$TLS TLS_KEY=$TLS_KEY TLS_GROUPS='$TLS_GROUPS'"
log "# $("$PG_BIN/postgres" --version); $("$PGBOUNCER" --version | head -1); temp dir $TMP"

# ---- the load generator -------------------------------------------------
# Always (re)build the default binaries: a stale release build would measure
# old code under the current commit's name. A no-op when up to date.
if [ "$LOADTEST_BIN" = "$BUILD_DIR/release/pgferry-loadtest" ] || [ "$PGFERRY_BIN" = "$BUILD_DIR/release/pgferry" ]; then
    run cargo build --release -p pgferry-loadtest -p pgferry-proxy --manifest-path "$REPO/Cargo.toml" || die "cannot build"
fi

# ---- PostgreSQL ------------------------------------------------------------
PG_PORT=$(free_port)
run as_user "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
cat >>"$PG_DATA/postgresql.conf" <<EOF
# bench.sh
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP'
max_connections = $MAX_CONNECTIONS
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
EOF
log "# postgresql.conf additions:"; sed -n '/^# bench.sh/,$p' "$PG_DATA/postgresql.conf" | tee -a "$RESULTS"
run as_user "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$TMP/postgresql.log" -w start
PG_PID=$(head -1 "$PG_DATA/postmaster.pid")
psql_admin() { as_user "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP" -p "$PG_PORT" -U postgres "$@"; }
run psql_admin -c "CREATE ROLE $BENCH_USER LOGIN PASSWORD '$BENCH_PASSWORD'"
run psql_admin -c "CREATE DATABASE $BENCH_DB OWNER $BENCH_USER"
export PGPASSWORD=$BENCH_PASSWORD
run "$PG_BIN/pgbench" -i -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$BENCH_USER" "$BENCH_DB"

# The SCRAM secrets both poolers check client logins against.
psql_admin -At -c "SELECT '\"' || rolname || '\" \"' || rolpassword || '\"' FROM pg_authid WHERE rolname = '$BENCH_USER'" >"$TMP/userlist.txt"
chown "$RUN_AS" "$TMP/userlist.txt"
chmod 600 "$TMP/userlist.txt"

# ---- PgBouncer -------------------------------------------------------------
# Starts PgBouncer as $RUN_AS: start_pgbouncer NAME PORT [extra ini lines];
# sets STARTED_PID.
start_pgbouncer() {
    local name=$1 port=$2 extra=${3:-}
    cat >"$TMP/$name.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
listen_backlog = 4096
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $TMP/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 12000
log_connections = 0
log_disconnections = 0
logfile = $TMP/$name.log
ignore_startup_parameters = extra_float_digits
$extra
EOF
    chown "$RUN_AS" "$TMP/$name.ini"
    log "# $name.ini:"; tee -a "$RESULTS" <"$TMP/$name.ini"
    log "+ $PGBOUNCER $TMP/$name.ini (as $RUN_AS)"
    "${AS_USER[@]}" "$PGBOUNCER" "$TMP/$name.ini" >/dev/null 2>"$TMP/$name.stderr" &
    STARTED_PID=$!
    wait_port "$port" "$STARTED_PID" || die "$name did not start: $(tail -5 "$TMP/$name.stderr" "$TMP/$name.log" 2>/dev/null)"
}

PGBOUNCER_PORT=$(free_port)
start_pgbouncer pgbouncer "$PGBOUNCER_PORT"
PGBOUNCER_PID=$STARTED_PID

# ---- TLS: certificate and the TLS-only PgBouncer -------------------------------
PGBOUNCER_TLS_PORT=
if [ "$TLS" = 1 ]; then
    case $TLS_KEY in
    ec) keyopts=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    rsa) keyopts=(-newkey rsa:2048) ;;
    *) die "TLS_KEY must be ec or rsa" ;;
    esac
    run openssl req -x509 "${keyopts[@]}" -nodes -days 30 -subj /CN=localhost \
        -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout "$TMP/server.key" -out "$TMP/server.crt"
    chown "$RUN_AS" "$TMP/server.key" "$TMP/server.crt"
    chmod 600 "$TMP/server.key"
    log "# certificate: $(openssl x509 -in "$TMP/server.crt" -noout -text | grep -m1 'Public Key Algorithm' | sed 's/^ *//'), $(openssl version)"
    PGBOUNCER_TLS_PORT=$(free_port)
    start_pgbouncer pgbouncer-tls "$PGBOUNCER_TLS_PORT" "client_tls_sslmode = require
client_tls_key_file = $TMP/server.key
client_tls_cert_file = $TMP/server.crt"
    PGBOUNCER_TLS_PID=$STARTED_PID
fi

# ---- pgferry ----------------------------------------------------------------
if [ ! -x "$PGFERRY_BIN" ]; then
    run cargo build --release -p pgferry-proxy --manifest-path "$REPO/Cargo.toml" || true
fi
if [ -x "$PGFERRY_BIN" ]; then
    cp "$PGFERRY_BIN" "$TMP/pgferry" # readable by $RUN_AS whatever the build dir's permissions
fi

# Starts pgferry as $RUN_AS: start_pgferry NAME PORT [extra TOML]; sets
# STARTED_PID (empty when it is not serving) and STARTED_OK (1 when it answered
# a psql SELECT 1, over TLS when the extra TOML has a [tls] section).
start_pgferry() {
    local name=$1 port=$2 extra=${3:-} sslmode=${PGSSLMODE:-prefer} st
    STARTED_PID=
    STARTED_OK=1
    local bin=${START_BIN:-$TMP/pgferry}
    if [ ! -x "$bin" ]; then
        STARTED_OK=0
        echo "no binary at $bin" >"$TMP/$name.log"
    else
        sched_line=
        if [ -n "${START_SCHEDULER:-}" ]; then
            sched_line="scheduler = \"$START_SCHEDULER\""
        fi
        if [ -n "${START_PARK:-}" ]; then
            sched_line="$sched_line
park_idle_after = \"$START_PARK\""
        fi
        cat >"$TMP/$name.toml" <<EOF
[listen]
rw = "127.0.0.1:$port"
ro = "127.0.0.1:$(free_port)"
backlog = 4096

[limits]
max_client_conn = 12000
# All the load comes from 127.0.0.1: the per-address login guard (a DoS
# limit PgBouncer does not have) would refuse the connect workload's logins.
max_pending_logins_per_address = 0

[runtime]
worker_threads = ${START_WORKERS:-$PGFERRY_WORKERS}
$sched_line

[auth]
method = "scram-sha-256"
users_file = "$TMP/userlist.txt"

[pool]
pool_mode = "transaction"
pool_size = $POOL

[topology]
source = "static"
primary = "127.0.0.1:$PG_PORT"

[[user]]
name = "$BENCH_USER"
server_password = "$BENCH_PASSWORD"
$extra
EOF
        chown "$RUN_AS" "$TMP/$name.toml"
        log "# $name.toml:"; tee -a "$RESULTS" <"$TMP/$name.toml"
        log "+ $bin --config $TMP/$name.toml (as $RUN_AS; binary copied from ${START_FROM:-$PGFERRY_BIN})"
        # shellcheck disable=SC2086 # START_ENV: NAME=VALUE words
        env ${START_ENV:-} PGFERRY_LOG=${PGFERRY_LOG:-warn} "${AS_USER[@]}" "$bin" --config "$TMP/$name.toml" >"$TMP/$name.log" 2>&1 &
        STARTED_PID=$!
        case $extra in *"[tls]"*) sslmode=require ;; esac
        if ! wait_port "$port" "$STARTED_PID"; then
            STARTED_OK=0
        elif ! PGSSLMODE=$sslmode "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U "$BENCH_USER" -d "$BENCH_DB" -c "SELECT 1" >>"$TMP/$name.log" 2>&1; then
            STARTED_OK=0
        fi
    fi
    if [ "$STARTED_OK" = 0 ]; then
        if [ -n "$STARTED_PID" ] && ! kill -0 "$STARTED_PID" 2>/dev/null; then
            wait "$STARTED_PID" && st=0 || st=$?
            log "# $name exited with status $st"
            STARTED_PID=
        fi
        log "# WARNING: $name is not serving; continuing without it. Last lines of its log:"
        tail -20 "$TMP/$name.log" 2>/dev/null | sed 's/^/#   /' | tee -a "$RESULTS"
    fi
}

PGFERRY_PORT=$(free_port)
START_ENV=${PGFERRY_ENV:-} START_SCHEDULER=$PGFERRY_SCHEDULER START_PARK=${PGFERRY_PARK:-} start_pgferry pgferry "$PGFERRY_PORT"
PGFERRY_PID=$STARTED_PID
PGFERRY_OK=$STARTED_OK

PGFERRY_BASE_PORT=
PGFERRY_BASE_OK=0
if [ -n "${PGFERRY_BASE_BIN:-}" ]; then
    cp "$PGFERRY_BASE_BIN" "$TMP/pgferry-base"
    PGFERRY_BASE_PORT=$(free_port)
    START_ENV=${PGFERRY_BASE_ENV:-} START_BIN="$TMP/pgferry-base" START_FROM="$PGFERRY_BASE_BIN" START_WORKERS=${PGFERRY_BASE_WORKERS:-$PGFERRY_WORKERS} \
        START_SCHEDULER=${PGFERRY_BASE_SCHEDULER:-$PGFERRY_SCHEDULER} START_PARK=${PGFERRY_BASE_PARK:-${PGFERRY_PARK:-}} \
        start_pgferry pgferry-base "$PGFERRY_BASE_PORT"
    PGFERRY_BASE_PID=$STARTED_PID
    PGFERRY_BASE_OK=$STARTED_OK
fi

PGFERRY_TLS_PORT=
PGFERRY_TLS_OK=0
if [ "$TLS" = 1 ]; then
    PGFERRY_TLS_PORT=$(free_port)
    start_pgferry pgferry-tls "$PGFERRY_TLS_PORT" "
[tls]
client_tls = \"require\"
cert_file = \"$TMP/server.crt\"
key_file = \"$TMP/server.key\""
    PGFERRY_TLS_PID=$STARTED_PID
    PGFERRY_TLS_OK=$STARTED_OK
fi

# ---- HAProxy (TCP relay) ------------------------------------------------------
HAPROXY_PORT=
case " $TARGETS " in *" haproxy "*)
    HAPROXY_PORT=$(free_port)
    cat >"$TMP/haproxy.cfg" <<EOF
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen pg
    bind 127.0.0.1:$HAPROXY_PORT
    server pg 127.0.0.1:$PG_PORT
EOF
    chown "$RUN_AS" "$TMP/haproxy.cfg"
    log "# haproxy.cfg ($("$HAPROXY" -v | head -1)):"; tee -a "$RESULTS" <"$TMP/haproxy.cfg"
    "${AS_USER[@]}" "$HAPROXY" -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
    HAPROXY_PID=$!
    wait_port "$HAPROXY_PORT" "$HAPROXY_PID" || die "haproxy did not start: $(tail -5 "$TMP/haproxy.log")"
    ;;
esac

# ---- tokio-relay (the floor of a Tokio proxy) --------------------------------
TOKIO_RELAY_PORT=
case " $TARGETS " in *" tokio-relay "*)
    TOKIO_RELAY_BIN=${TOKIO_RELAY_BIN:-$(dirname "$LOADTEST_BIN")/tokio-relay}
    [ -x "$TOKIO_RELAY_BIN" ] || die "no $TOKIO_RELAY_BIN: cargo build --release -p pgferry-loadtest"
    cp "$TOKIO_RELAY_BIN" "$TMP/tokio-relay" && chmod 755 "$TMP/tokio-relay"
    TOKIO_RELAY_PORT=$(free_port)
    log "# tokio-relay: ${TOKIO_RELAY_THREADS:-1} thread(s), one task and one PostgreSQL connection per client"
    "${AS_USER[@]}" "$TMP/tokio-relay" "127.0.0.1:$TOKIO_RELAY_PORT" "127.0.0.1:$PG_PORT" "${TOKIO_RELAY_THREADS:-1}" \
        >"$TMP/tokio-relay.log" 2>&1 &
    TOKIO_RELAY_PID=$!
    wait_port "$TOKIO_RELAY_PORT" "$TOKIO_RELAY_PID" || die "tokio-relay did not start: $(tail -5 "$TMP/tokio-relay.log")"
    ;;
esac

# ---- targets --------------------------------------------------------------
declare -A PORT=([direct]=$PG_PORT [pgbouncer]=$PGBOUNCER_PORT [pgferry]=$PGFERRY_PORT
    [pgbouncer-tls]=$PGBOUNCER_TLS_PORT [pgferry-tls]=$PGFERRY_TLS_PORT [pgferry-base]=$PGFERRY_BASE_PORT
    [haproxy]=$HAPROXY_PORT [tokio-relay]=$TOKIO_RELAY_PORT)
declare -A PID=([pgbouncer]=$PGBOUNCER_PID [pgferry]=$PGFERRY_PID
    [pgbouncer-tls]=$PGBOUNCER_TLS_PID [pgferry-tls]=$PGFERRY_TLS_PID [pgferry-base]=$PGFERRY_BASE_PID
    [haproxy]=$HAPROXY_PID [tokio-relay]=$TOKIO_RELAY_PID)
# What direct PostgreSQL can take while the poolers hold their pools.
NPOOLERS=2
if [ "$TLS" = 1 ]; then NPOOLERS=4; fi
if [ "$PGFERRY_BASE_OK" = 1 ]; then NPOOLERS=$((NPOOLERS + 1)); fi
DIRECT_MAX=$((MAX_CONNECTIONS - 3 - NPOOLERS * POOL - 5))

# Targets usable at $1 clients, out of $2 (default $TARGETS).
targets_for() {
    local t out=()
    for t in ${2:-$TARGETS}; do
        case $t in
        # HAProxy opens one server connection per client, like direct.
        direct | haproxy | tokio-relay) [ "$1" -le "$DIRECT_MAX" ] || continue ;;
        pgferry) [ "$PGFERRY_OK" = 1 ] || continue ;;
        pgferry-tls) [ "$PGFERRY_TLS_OK" = 1 ] || continue ;;
        pgferry-base) [ "$PGFERRY_BASE_OK" = 1 ] || continue ;;
        *-tls) [ -n "${PORT[$t]:-}" ] || continue ;;
        esac
        out+=("$t")
    done
    echo "${out[@]}"
}

# pgferry-loadtest's --target and --pid arguments for the targets "$@", one a
# line (targets named *-tls get tls:).
target_args() {
    local t tls
    for t in "$@"; do
        tls=
        case $t in *-tls) tls=tls: ;; esac
        printf '%s\n' --target "$t=${tls}127.0.0.1:${PORT[$t]}"
        if [ -n "${PID[$t]:-}" ]; then
            printf '%s\n' --pid "$t=${PID[$t]}"
        fi
    done
}

log "# targets: direct=127.0.0.1:$PG_PORT (postmaster pid $PG_PID) pgbouncer=127.0.0.1:$PGBOUNCER_PORT (pid $PGBOUNCER_PID) pgferry=127.0.0.1:$PGFERRY_PORT (pid ${PGFERRY_PID:-none}, serving=$PGFERRY_OK)"
if [ "$TLS" = 1 ]; then
    log "# TLS targets (client TLS required): pgbouncer-tls=127.0.0.1:$PGBOUNCER_TLS_PORT (pid $PGBOUNCER_TLS_PID) pgferry-tls=127.0.0.1:$PGFERRY_TLS_PORT (pid ${PGFERRY_TLS_PID:-none}, serving=$PGFERRY_TLS_OK)"
fi
log "# direct is skipped above $DIRECT_MAX clients (max_connections=$MAX_CONNECTIONS minus 3 reserved and all pools)"

LT_COMMON=(--user "$BENCH_USER" --password "$BENCH_PASSWORD" --dbname "$BENCH_DB" --scale "$SCALE")
LT_RATE=()
if [ "${RATE:-0}" != 0 ]; then
    LT_RATE=(--rate "$RATE")
fi
if [ -n "$TLS_GROUPS" ]; then
    LT_COMMON+=(--tls-groups "$TLS_GROUPS")
fi

# ---- idle clients (first, while the proxies are fresh) ---------------------------
if [ "$IDLE_CLIENTS" -gt 0 ]; then
    args=()
    for t in pgbouncer pgferry pgferry-base; do
        case " $TARGETS " in *" $t "*) ;; *) continue ;; esac
        [ "$t" = pgferry ] && [ "$PGFERRY_OK" = 0 ] && continue
        [ "$t" = pgferry-base ] && [ "$PGFERRY_BASE_OK" = 0 ] && continue
        args+=(--target "$t=127.0.0.1:${PORT[$t]}" --pid "$t=${PID[$t]}")
    done
    if [ "${#args[@]}" -gt 0 ]; then
        log ""
        log "## idle clients: $IDLE_CLIENTS"
        after=()
        if [ -n "${IDLE_AFTER:-}" ]; then
            after=(--after "${IDLE_AFTER}s")
        fi
        run "$LOADTEST_BIN" "${args[@]}" "${LT_COMMON[@]}" --idle-clients "$IDLE_CLIENTS" --hold "${HOLD}s" "${after[@]}" --json ||
            log "# (exit status $?)"
    fi
fi


for clients in $CLIENTS; do
    read -r -a tg <<<"$(targets_for "$clients")"
    [ "${#tg[@]}" -gt 0 ] || { log "# no target can take $clients clients"; continue; }
    for workload in $WORKLOADS; do
        mapfile -t args < <(target_args "${tg[@]}")
        log ""
        log "## pgferry-loadtest workload=$workload clients=$clients"
        run "$LOADTEST_BIN" "${args[@]}" "${LT_COMMON[@]}" --clients "$clients" --workload "$workload" \
            --duration "${DURATION}s" --warmup "${WARMUP}s" --rounds "$ROUNDS" "${LT_RATE[@]}" --json || log "# (exit status $?)"
    done
    for mode in $PGBENCH_MODES; do
        log ""
        case $mode in
            tpcb) script=(-M simple) ;;
            *) script=(-S -M "$mode") ;;
        esac
        log "## pgbench ${script[*]} clients=$clients"
        for t in "${tg[@]}"; do
            pid=${PID[$t]:-}
            before=0
            [ -n "$pid" ] && before=$(cpu_ticks "$pid") && before_user=$(user_ticks "$pid")
            perf_pid=
            if [ "${SYSCALLS:-0}" = 1 ] && [ -n "$pid" ]; then
                perf stat -x, -e raw_syscalls:sys_enter,context-switches,cpu-migrations -p "$pid" \
                    -o "$TMP/perf-stat.txt" &
                perf_pid=$!
            fi
            out=$TMP/pgbench.out
            # pgbench's -T includes its connection phase, which runs PBKDF2
            # per SCRAM login (about 7 s for 1000 clients here): allow for it.
            sslmode=${PGSSLMODE:-prefer}
            case $t in *-tls) sslmode=require ;; esac
            PGSSLMODE=$sslmode run "$PG_BIN/pgbench" -n "${script[@]}" -c "$clients" -j 2 -T "$((DURATION + (clients + 99) / 100))" \
                -h 127.0.0.1 -p "${PORT[$t]}" -U "$BENCH_USER" "$BENCH_DB" >"$out" || true
            sys=
            if [ -n "$perf_pid" ]; then
                kill -INT "$perf_pid" 2>/dev/null || true
                wait "$perf_pid" 2>/dev/null || true
                n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -1)
                if [ -n "$n" ] && [ "$n" -gt 0 ]; then
                    sys=$(awk -F, -v n="$n" '$3 == "raw_syscalls:sys_enter" { s = $1 } $3 == "context-switches" { c = $1 }
                        $3 == "cpu-migrations" { m = $1 } END { printf " syscalls=%.2f/txn cs=%.2f/txn migr=%.3f/txn", s / n, c / n, m / n }' \
                        "$TMP/perf-stat.txt")
                fi
            fi
            cat "$out"
            tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -1)
            lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | head -1)
            txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -1)
            cpu=-
            user=
            if [ -n "$pid" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
                cpu=$(awk -v a="$before" -v b="$(cpu_ticks "$pid")" -v n="$txns" -v hz="$(getconf CLK_TCK)" \
                    'BEGIN { printf "%.1f", (b - a) * 1e6 / hz / n }')
                user=$(awk -v a="$before_user" -v b="$(user_ticks "$pid")" -v n="$txns" -v hz="$(getconf CLK_TCK)" \
                    'BEGIN { printf " user=%.1fus/txn", (b - a) * 1e6 / hz / n }')
            fi
            aborted=
            grep -q "Run was aborted" "$out" && aborted=" aborted(see errors above)"
            log "pgbench target=$t clients=$clients mode=$mode tps=${tps:-failed} latency_avg=${lat:--}ms cpu=${cpu}us/txn$user$sys$aborted"
        done
    done
done

# ---- connect per transaction ------------------------------------------------
for clients in $CONNECT_CLIENTS; do
    read -r -a tg <<<"$(targets_for "$clients" "$CONNECT_TARGETS")"
    [ "${#tg[@]}" -gt 0 ] || { log "# no target can take $clients clients"; continue; }
    mapfile -t args < <(target_args "${tg[@]}")
    log ""
    log "## pgferry-loadtest workload=connect clients=$clients"
    run "$LOADTEST_BIN" "${args[@]}" "${LT_COMMON[@]}" --clients "$clients" --workload connect \
        --duration "${DURATION}s" --warmup "${WARMUP}s" --rounds "$ROUNDS" --json || log "# (exit status $?)"
done

# ---- soak -------------------------------------------------------------------
if [ "${SOAK:-0}" -gt 0 ]; then
    for t in ${SOAK_TARGETS:-pgferry}; do
        read -r -a tg <<<"$(targets_for "${SOAK_CLIENTS:-10000}" "$t")"
        [ "${#tg[@]}" -gt 0 ] || { log "# soak: $t cannot take ${SOAK_CLIENTS:-10000} clients"; continue; }
        mapfile -t args < <(target_args "$t")
        log ""
        log "## soak target=$t seconds=$SOAK"
        run "$LOADTEST_BIN" "${args[@]}" "${LT_COMMON[@]}" --clients "${SOAK_CLIENTS:-10000}" --workload select-simple \
            --soak "${SOAK}s" --warmup "${SOAK_WARMUP:-300}s" --sample "${SOAK_SAMPLE:-30}s" --rate "${RATE:-1}" \
            --active-fraction "${SOAK_ACTIVE:-0.2}" --reconnect-rate "${SOAK_RECONNECT:-0.01}" || log "# (exit status $?)"
    done
fi

log ""
log "## summary"
grep -E '^(summary|target |direct |haproxy |pgbouncer(-tls)? |pgferry(-tls|-base)? |tokio-relay |tls target=|pgbench target=|idle target=.*(process|connected)=|soak (summary|passed)|pgferry-loadtest: soak)' "$RESULTS" | tee -a "$RESULTS.summary" >/dev/null || true
cat "$RESULTS.summary" | tee -a "$RESULTS"
rm -f "$RESULTS.summary"
