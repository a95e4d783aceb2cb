#!/usr/bin/env bash
# pgferry quickstart on a Debian 12 machine: etcd, a two-member Patroni
# cluster (Debian's packages) and pgferry following its leader through etcd.
#
#   deploy/quickstart.sh               install what is missing, build, start, run pgferry
#   deploy/quickstart.sh --citus       Patroni in Citus mode: a coordinator and two worker groups
#                                      (needs Citus installed: ../shared/citus/install.sh)
#   deploy/quickstart.sh --static      a plain primary + streaming standby, no etcd or Patroni
#   deploy/quickstart.sh --background  start pgferry in the background (log: .run/pgferry.log)
#   deploy/quickstart.sh switchover    a Patroni switchover while a client writes through pgferry
#   deploy/quickstart.sh status        what runs, and who leads
#   deploy/quickstart.sh stop          stop pgferry, Patroni, PostgreSQL and etcd
#   deploy/quickstart.sh reset         stop them and delete .run/ (start over)
#
# Run it as root or as a user who may sudo. Re-running it is safe: running
# parts are reused. Everything it creates lives in .run/ (gitignored). The
# mode is remembered: `reset` before switching to another.
#
# Environment (defaults):
#   PG_PRIMARY_PORT=15432  PG_STANDBY_PORT=15433   PostgreSQL members, on 127.0.0.1
#   ETCD_PORT=12379        PATRONI_REST_PORT=18008 etcd client port (peer +1); first REST port
#   PGFERRY_RW_PORT=5432   PGFERRY_RO_PORT=5433    pgferry, on 0.0.0.0
#   PGFERRY_HTTP_PORT=8404                         metrics and status page, on 127.0.0.1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN="$ROOT/.run"
PG_BIN=/usr/lib/postgresql/15/bin
PG_PRIMARY_PORT=${PG_PRIMARY_PORT:-15432}
PG_STANDBY_PORT=${PG_STANDBY_PORT:-15433}
ETCD_PORT=${ETCD_PORT:-12379}
PATRONI_REST_PORT=${PATRONI_REST_PORT:-18008}
PGFERRY_RW_PORT=${PGFERRY_RW_PORT:-5432}
PGFERRY_RO_PORT=${PGFERRY_RO_PORT:-5433}
PGFERRY_HTTP_PORT=${PGFERRY_HTTP_PORT:-8404}
APP_USER=app
APP_PASSWORD=app
APP_DB=app
SCOPE=quickstart
# Local-only cluster passwords (PostgreSQL and Patroni listen on 127.0.0.1).
SUPERUSER_PASSWORD=quickstart-postgres
REPLICATION_PASSWORD=quickstart-replicator

say() { printf '\033[1mquickstart:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31mquickstart: %s\033[0m\n' "$*" >&2; exit 1; }

MODE=
CMD=start
BACKGROUND=no
for arg in "$@"; do
    case "$arg" in
        --patroni) MODE=patroni ;;
        --citus) MODE=citus ;;
        --static) MODE=static ;;
        --background) BACKGROUND=yes ;;
        start | stop | reset | status | switchover) CMD=$arg ;;
        -h | --help | help)
            sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument '$arg' (see deploy/quickstart.sh --help)" ;;
    esac
done
SAVED_MODE=$(cat "$RUN/mode" 2>/dev/null || true)
if [ -n "$SAVED_MODE" ] && [ -n "$MODE" ] && [ "$MODE" != "$SAVED_MODE" ] && [ "$CMD" = start ]; then
    die ".run/ holds a --$SAVED_MODE setup: deploy/quickstart.sh reset first, then --$MODE"
fi
MODE=${MODE:-${SAVED_MODE:-patroni}}

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    SUDO=(__no_sudo__)
fi
as_root() {
    if [ "${SUDO[0]:-}" = __no_sudo__ ]; then
        die "need root for: $* (run as root, or install sudo)"
    fi
    "${SUDO[@]}" "$@"
}

# ---------------------------------------------------------------------------
# The OS user PostgreSQL, Patroni and etcd run as (PostgreSQL refuses root),
# remembered: the package install may create `postgres` after a first run
# chose another user.
if [ -s "$RUN/os-user" ]; then
    PG_OS_USER=$(cat "$RUN/os-user")
elif [ "$(id -u)" -eq 0 ]; then
    if id -u postgres >/dev/null 2>&1; then
        PG_OS_USER=postgres
    else
        PG_OS_USER=pgferry-test
    fi
else
    PG_OS_USER=$(id -un)
fi
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u "$PG_OS_USER" -- env -u PGDATA -u PGPORT -u PGHOST "$@")
    else
        env -u PGDATA -u PGPORT -u PGHOST "$@"
    fi
}

# Data directories: .run/pg, unless the PostgreSQL user cannot reach it (a
# checkout under /root, say); then /var/tmp/pgferry-quickstart-<hash>, with a
# .run/pg symlink to it.
data_base() {
    if [ -L "$RUN/pg" ]; then
        readlink "$RUN/pg"
    else
        echo "$RUN/pg"
    fi
}
BASE=$(data_base)

running() { # DATADIR -> 0 if a postmaster runs there
    [ -f "$1/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1
}

running_port() { # DATADIR -> the port of its running postmaster
    sed -n 4p "$1/postmaster.pid"
}

alive() { # PIDFILE -> 0 if its process runs
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# start_bg NAME CMD...: runs CMD as the PostgreSQL user, detached, its pid
# in $BASE/NAME.pid and its output in $BASE/NAME.log.
start_bg() {
    local name=$1
    shift
    as_pg setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$BASE/$name.pid" "$@" \
        >>"$BASE/$name.log" 2>&1 </dev/null &
    for _ in $(seq 1 50); do
        [ -s "$BASE/$name.pid" ] && return 0
        sleep 0.1
    done
    die "$name did not start (log: $BASE/$name.log)"
}

stop_pid() { # NAME [SIGNAL]: stops the process of $BASE/NAME.pid, waits up to 60 s
    local f="$BASE/$1.pid" pid
    alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    say "stopping $1 (pid $pid)"
    kill "-${2:-TERM}" "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
}

# Patroni members: NAME GROUP PG_PORT REST_PORT, one per line.
members() {
    case "$MODE" in
        patroni)
            echo "pg1 - $PG_PRIMARY_PORT $PATRONI_REST_PORT"
            echo "pg2 - $PG_STANDBY_PORT $((PATRONI_REST_PORT + 1))"
            ;;
        citus)
            echo "coordinator 0 $PG_PRIMARY_PORT $PATRONI_REST_PORT"
            echo "worker1 1 $((PG_PRIMARY_PORT + 10)) $((PATRONI_REST_PORT + 1))"
            echo "worker2 2 $((PG_PRIMARY_PORT + 20)) $((PATRONI_REST_PORT + 2))"
            ;;
    esac
}

stop_all() {
    stop_pid pgferry
    if [ "$MODE" = static ]; then
        for node in standby primary; do
            if [ -d "$BASE/$node" ] && running "$BASE/$node"; then
                say "stopping the $node ($BASE/$node)"
                as_pg "$PG_BIN/pg_ctl" -D "$BASE/$node" -m fast -w -t 60 stop >/dev/null
            fi
        done
        return
    fi
    # Replicas first, so the leader stays leader (no failover on the way out).
    local name leader
    leader=$(etcd_leader 0 2>/dev/null || true)
    while read -r name _ _ _; do
        [ "$name" = "$leader" ] || stop_pid "patroni-$name"
    done < <(members)
    [ -z "$leader" ] || stop_pid "patroni-$leader"
    # A Patroni killed hard leaves its postmaster running.
    while read -r name _ _ _; do
        if [ -d "$BASE/$name/data" ] && running "$BASE/$name/data"; then
            as_pg "$PG_BIN/pg_ctl" -D "$BASE/$name/data" -m fast -w -t 60 stop >/dev/null || true
        fi
    done < <(members)
    stop_pid etcd
}

etcdctl_() {
    ETCDCTL_API=3 etcdctl --endpoints="127.0.0.1:$ETCD_PORT" --command-timeout=2s "$@"
}

etcd_key() { # GROUP: the key prefix of a Patroni cluster ("-": not Citus)
    if [ "$1" = - ]; then
        echo "/service/$SCOPE"
    else
        echo "/service/$SCOPE/$1"
    fi
}

etcd_leader() { # GROUP ("-" or a Citus group) -> the leader's member name
    local g=$1
    [ "$MODE" = patroni ] && g=-
    etcdctl_ get --print-value-only "$(etcd_key "$g")/leader"
}

member_port() { # NAME -> its PostgreSQL port
    members | awk -v n="$1" '$1 == n { print $3 }'
}

case "$CMD" in
    start) ;;
    stop)
        if [ -e "$RUN" ]; then stop_all; fi
        say "stopped"
        exit 0
        ;;
    reset)
        if [ -e "$RUN" ]; then
            stop_all
            if [ "$BASE" != "$RUN/pg" ]; then rm -rf "$BASE"; fi
            rm -rf "$RUN"
        fi
        say "removed .run/"
        exit 0
        ;;
    status)
        [ -e "$RUN/mode" ] || die "nothing set up yet: deploy/quickstart.sh"
        echo "mode: $MODE"
        alive "$BASE/pgferry.pid" && echo "pgferry: running (pid $(cat "$BASE/pgferry.pid"), log $BASE/pgferry.log)" ||
            echo "pgferry: not running in the background"
        if [ "$MODE" != static ]; then
            alive "$BASE/etcd.pid" && echo "etcd: 127.0.0.1:$ETCD_PORT" || echo "etcd: stopped"
            while read -r name g port rest; do
                state=stopped
                alive "$BASE/patroni-$name.pid" && state=$(curl -s "http://127.0.0.1:$rest/patroni" |
                    sed -n 's/.*"role": *"\([a-z_]*\)".*/\1/p')
                echo "member $name: PostgreSQL 127.0.0.1:$port, Patroni REST 127.0.0.1:$rest, ${state:-unknown}"
            done < <(members)
        fi
        exit 0
        ;;
    switchover) ;;
esac

if [ "$CMD" = switchover ]; then
    # -----------------------------------------------------------------------
    # A switchover while pgbench writes through pgferry: the client sees a
    # pause, not an error.
    [ "$MODE" = patroni ] || die "switchover: only in the default mode (two Patroni members)"
    (exec 3<>"/dev/tcp/127.0.0.1/$PGFERRY_RW_PORT") 2>/dev/null ||
        die "pgferry is not listening on $PGFERRY_RW_PORT: start it first (deploy/quickstart.sh --background, or in another terminal)"
    leader=$(etcd_leader -)
    [ -n "$leader" ] || die "no Patroni leader now"
    candidate=pg1
    [ "$leader" = pg1 ] && candidate=pg2
    export PGPASSWORD=$APP_PASSWORD
    conn=(-h 127.0.0.1 -p "$PGFERRY_RW_PORT" -U "$APP_USER")
    "$PG_BIN/psql" "${conn[@]}" -d "$APP_DB" -X -q -v ON_ERROR_STOP=1 \
        -c "CREATE TABLE IF NOT EXISTS quickstart_writes (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())"
    before=$("$PG_BIN/psql" "${conn[@]}" -d "$APP_DB" -X -A -t -c "SELECT count(*) FROM quickstart_writes")
    script=$(mktemp)
    echo "INSERT INTO quickstart_writes DEFAULT VALUES;" >"$script"
    say "pgbench: 4 clients inserting through pgferry for 12 s; switchover $leader -> $candidate after 4 s"
    "$PG_BIN/pgbench" "${conn[@]}" -n -c 4 -j 2 -T 12 -P 2 -f "$script" "$APP_DB" >"$RUN/switchover-pgbench.log" 2>&1 &
    bench=$!
    sleep 4
    t0=$(date +%s.%N)
    curl -sS -XPOST "http://127.0.0.1:$PATRONI_REST_PORT/switchover" \
        -d "{\"leader\":\"$leader\",\"candidate\":\"$candidate\"}" -o "$RUN/switchover.out" \
        --retry 0 --max-time 60 || true
    say "Patroni: $(cat "$RUN/switchover.out")"
    for _ in $(seq 1 300); do
        [ "$(etcd_leader -)" = "$candidate" ] && break
        sleep 0.1
    done
    t1=$(date +%s.%N)
    status=0
    wait "$bench" || status=$?
    rm -f "$script"
    cat "$RUN/switchover-pgbench.log" >&2
    after=$("$PG_BIN/psql" "${conn[@]}" -d "$APP_DB" -X -A -t -c "SELECT count(*) FROM quickstart_writes")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$RUN/switchover-pgbench.log")
    processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$RUN/switchover-pgbench.log")
    echo
    say "leader now: $(etcd_leader -) (leader key moved $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s after the request)"
    say "pgbench: exit status $status, ${processed:-?} transactions, ${failed:-?} failed; rows added: $((after - before))"
    [ "$status" = 0 ] && [ "${failed:-1}" = 0 ] && [ "$((after - before))" = "${processed:-x}" ] ||
        die "the switchover was not a non-event for the client (see above and $BASE/pgferry.log)"
    say "the client saw a pause, not an error"
    exit 0
fi

# ---------------------------------------------------------------------------
# 1. Packages.
. "$ROOT/deploy/packages.sh"
want=("${PGFERRY_BUILD_PKGS[@]}")
[ "$MODE" = static ] || want+=("${PGFERRY_PATRONI_PKGS[@]}")
mapfile -t missing < <(missing_pkgs "${want[@]}")
if [ ${#missing[@]} -gt 0 ]; then
    had_main_cluster=no
    [ -d /etc/postgresql/15/main ] && had_main_cluster=yes
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    # Installing postgresql-15 creates and starts a "15/main" cluster on
    # 5432, pgferry's port. We did not ask for it: stop it and keep it from
    # starting at boot.
    if [ "$had_main_cluster" = no ] && [ -d /etc/postgresql/15/main ]; then
        say "stopping the Debian cluster 15/main that the package started (start.conf: manual)"
        as_root pg_ctlcluster 15 main stop 2>/dev/null || true
        echo manual | as_root tee /etc/postgresql/15/main/start.conf >/dev/null
    fi
    # etcd-server starts a default etcd on 2379 and patroni may start a
    # service: not ours either.
    for unit in etcd patroni; do
        if systemctl is-active --quiet "$unit" 2>/dev/null; then
            say "stopping the $unit service the package started (systemctl disable $unit)"
            as_root systemctl disable --now "$unit" >/dev/null 2>&1 || true
        fi
    done
fi
[ -x "$PG_BIN/initdb" ] || die "$PG_BIN/initdb not found: is postgresql-15 installed?"
if [ "$MODE" = citus ] && [ ! -f /usr/lib/postgresql/15/lib/citus.so ]; then
    die "--citus needs the Citus extension for PostgreSQL 15 (here: ../shared/citus/install.sh; elsewhere the
    postgresql-15-citus package from Citus' repository)"
fi

# 2. Rust.
if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    else
        die "cargo not found. Install Rust with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
    . \"\$HOME/.cargo/env\"
then run deploy/quickstart.sh again."
    fi
fi

# 3. Build.
say "building pgferry (cargo build --release -p pgferry-proxy)"
(cd "$ROOT" && cargo build --release -p pgferry-proxy)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --no-deps --format-version 1 |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PGFERRY="${TARGET_DIR:-$ROOT/target}/release/pgferry"
[ -x "$PGFERRY" ] || die "build finished but $PGFERRY is missing"

# 4. The unprivileged OS user, and where the data lives.
if [ "$(id -u)" -eq 0 ] && ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
    say "creating OS user $PG_OS_USER for PostgreSQL"
    useradd --system --create-home --shell /usr/sbin/nologin "$PG_OS_USER"
fi
mkdir -p "$RUN"
if [ ! -e "$RUN/pg" ]; then
    mkdir -p "$RUN/pg"
    if [ "$(id -u)" -eq 0 ]; then
        chown "$PG_OS_USER:" "$RUN/pg"
        if ! runuser -u "$PG_OS_USER" -- test -w "$RUN/pg"; then
            rmdir "$RUN/pg"
            alt="/var/tmp/pgferry-quickstart-$(printf '%s' "$ROOT" | md5sum | cut -c1-8)"
            say "user $PG_OS_USER cannot reach $RUN: keeping the data in $alt"
            mkdir -p "$alt"
            chown "$PG_OS_USER:" "$alt"
            chmod 700 "$alt"
            ln -s "$alt" "$RUN/pg"
        fi
    fi
fi
BASE=$(data_base)
echo "$MODE" >"$RUN/mode"
echo "$PG_OS_USER" >"$RUN/os-user"
STARTED=$(date +%s)

# 5. Clusters.
start_static() {
    PRIMARY="$BASE/primary"
    STANDBY="$BASE/standby"
    start_node() { # NAME DATADIR
        if ! as_pg "$PG_BIN/pg_ctl" -D "$2" -l "$BASE/$1.log" -w -t 60 start >/dev/null; then
            tail -n 30 "$BASE/$1.log" >&2 || true
            die "the $1 did not start (log: $BASE/$1.log)"
        fi
    }
    write_settings() { # DATADIR PORT: settings we own, re-written on every start
        # Sockets beside (not in) the data directories, which pg_basebackup
        # copies; Unix socket paths are limited to 107 bytes.
        local sockdir=$BASE
        [ ${#sockdir} -le 80 ] || sockdir=/tmp
        as_pg tee "$1/pgferry-quickstart.conf" >/dev/null <<EOF
# Written by deploy/quickstart.sh on every start.
listen_addresses = '127.0.0.1'
port = $2
unix_socket_directories = '$sockdir'
max_connections = 200
wal_level = replica
max_wal_senders = 5
hot_standby = on
EOF
    }
    if [ ! -f "$PRIMARY/PG_VERSION" ]; then
        say "creating the primary in $PRIMARY"
        as_pg "$PG_BIN/initdb" -D "$PRIMARY" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
            -E UTF8 --locale=C >/dev/null
        echo "include_if_exists = 'pgferry-quickstart.conf'" | as_pg tee -a "$PRIMARY/postgresql.conf" >/dev/null
        as_pg tee "$PRIMARY/pg_hba.conf" >/dev/null <<'EOF'
# Written by deploy/quickstart.sh.
local   all             all                             trust
host    all             postgres        127.0.0.1/32    trust
host    replication     all             127.0.0.1/32    trust
host    all             all             127.0.0.1/32    scram-sha-256
EOF
    fi
    if running "$PRIMARY"; then
        PG_PRIMARY_PORT=$(running_port "$PRIMARY")
        say "the primary is already running on 127.0.0.1:$PG_PRIMARY_PORT"
    else
        write_settings "$PRIMARY" "$PG_PRIMARY_PORT"
        say "starting the primary on 127.0.0.1:$PG_PRIMARY_PORT"
        start_node primary "$PRIMARY"
    fi
    if [ ! -f "$STANDBY/PG_VERSION" ]; then
        say "creating the standby in $STANDBY (pg_basebackup -R)"
        as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PG_PRIMARY_PORT" -U postgres -D "$STANDBY" \
            -R -X stream -c fast
    fi
    if running "$STANDBY"; then
        PG_STANDBY_PORT=$(running_port "$STANDBY")
        say "the standby is already running on 127.0.0.1:$PG_STANDBY_PORT"
    else
        write_settings "$STANDBY" "$PG_STANDBY_PORT"
        say "starting the standby on 127.0.0.1:$PG_STANDBY_PORT"
        start_node standby "$STANDBY"
    fi
    LEADER_PORT=$PG_PRIMARY_PORT
    SUPERUSER_CONN=(-h 127.0.0.1 -U postgres)
}

start_etcd() {
    if alive "$BASE/etcd.pid"; then
        say "etcd is already running on 127.0.0.1:$ETCD_PORT"
        return
    fi
    say "starting etcd on 127.0.0.1:$ETCD_PORT"
    local client="http://127.0.0.1:$ETCD_PORT" peer="http://127.0.0.1:$((ETCD_PORT + 1))"
    start_bg etcd etcd --name quickstart --data-dir "$BASE/etcd" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "quickstart=$peer" --initial-cluster-state new \
        --initial-cluster-token "pgferry-quickstart" --enable-v2=false --logger=zap --log-outputs=stderr
    for _ in $(seq 1 100); do
        etcdctl_ endpoint health >/dev/null 2>&1 && return
        alive "$BASE/etcd.pid" || break
        sleep 0.2
    done
    tail -n 20 "$BASE/etcd.log" >&2 || true
    die "etcd did not become healthy (log: $BASE/etcd.log)"
}

patroni_yaml() { # NAME GROUP PG_PORT REST_PORT
    local name=$1 group=$2 port=$3 rest=$4 dir="$BASE/$1" citus="" params=""
    if [ "$group" != - ]; then
        citus="citus:
  group: $group
  database: $APP_DB"
        params="
        citus.local_hostname: '127.0.0.1'
        citus.enable_statistics_collection: 'off'"
    fi
    cat <<EOF
# Written by deploy/quickstart.sh.
scope: $SCOPE
namespace: /service/
name: $name
restapi:
  listen: 127.0.0.1:$rest
  connect_address: 127.0.0.1:$rest
etcd3:
  hosts: 127.0.0.1:$ETCD_PORT
$citus
bootstrap:
  dcs:
    ttl: 20
    loop_wait: 2
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    synchronous_mode: false
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        wal_log_hints: 'on'
        max_connections: 200
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 128MB
        password_encryption: scram-sha-256$params
  initdb:
  - encoding: UTF8
  - locale: C
  - data-checksums
postgresql:
  listen: 127.0.0.1:$port
  connect_address: 127.0.0.1:$port
  data_dir: $dir/data
  bin_dir: $PG_BIN
  pgpass: $dir/pgpass
  use_unix_socket: true
  basebackup:
  - checkpoint: fast
  authentication:
    superuser: {username: postgres, password: '$SUPERUSER_PASSWORD'}
    replication: {username: replicator, password: '$REPLICATION_PASSWORD'}
    rewind: {username: postgres, password: '$SUPERUSER_PASSWORD'}
  pg_hba:
  - local all all trust
  - host replication replicator 127.0.0.1/32 scram-sha-256
  - host all all 127.0.0.1/32 scram-sha-256
  parameters:
    unix_socket_directories: '$dir'
    shared_buffers: 64MB
    logging_collector: 'on'
    log_directory: '$dir/log'
    log_filename: postgresql.log
EOF
}

start_patroni() {
    start_etcd
    local name group port rest
    while read -r name group port rest; do
        as_pg mkdir -p "$BASE/$name"
        as_pg chmod 700 "$BASE/$name"
        patroni_yaml "$name" "$group" "$port" "$rest" | as_pg tee "$BASE/$name/patroni.yml" >/dev/null
    done < <(members)
    # The first member (of each Citus group) bootstraps; start it first so
    # it wins the race for the leader key.
    local first=yes
    while read -r name group port rest; do
        if alive "$BASE/patroni-$name.pid"; then
            say "Patroni $name is already running (PostgreSQL 127.0.0.1:$port)"
        else
            say "starting Patroni $name (PostgreSQL 127.0.0.1:$port, REST 127.0.0.1:$rest)"
            # Node-to-node connections (Citus) find the superuser password here.
            start_bg "patroni-$name" env PGPASSFILE="$BASE/pgpass" patroni "$BASE/$name/patroni.yml"
        fi
        if [ $first = yes ] && [ "$MODE" = patroni ]; then
            wait_leader - 60
            first=no
        fi
    done < <(members)
    if [ "$MODE" = citus ]; then
        for g in 0 1 2; do wait_leader "$g" 90; done
    fi
    local leader
    leader=$(etcd_leader 0)
    LEADER_PORT=$(member_port "$leader")
    SUPERUSER_CONN=(-h "$BASE/$leader" -U postgres)
}

wait_leader() { # GROUP SECONDS: until the group's leader key names a member that answers
    local g=$1 n=$(($2 * 5)) leader port
    for _ in $(seq 1 "$n"); do
        leader=$(etcd_leader "$g" 2>/dev/null || true)
        if [ -n "$leader" ]; then
            port=$(member_port "$leader")
            if [ -n "$port" ] && as_pg "$PG_BIN/pg_isready" -q -h "$BASE/$leader" -p "$port"; then
                return 0
            fi
        fi
        sleep 0.2
    done
    for f in "$BASE"/patroni-*.log; do
        echo "--- $f" >&2
        tail -n 15 "$f" >&2
    done
    die "no Patroni leader for ${g/-/the cluster} within $2 s"
}

if [ "$MODE" != static ]; then
    # The superuser password, for Patroni's own connections between members
    # and Citus' between nodes (pg_hba asks for SCRAM on TCP).
    if [ ! -s "$BASE/pgpass" ]; then
        printf '*:*:*:postgres:%s\n*:*:*:replicator:%s\n*:*:*:%s:%s\n' "$SUPERUSER_PASSWORD" \
            "$REPLICATION_PASSWORD" "$APP_USER" "$APP_PASSWORD" | as_pg tee "$BASE/pgpass" >/dev/null
        as_pg chmod 600 "$BASE/pgpass"
    fi
fi
case "$MODE" in
    static) start_static ;;
    patroni | citus) start_patroni ;;
esac

psql_leader() {
    as_pg env PGPASSFILE="$BASE/pgpass" "$PG_BIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 \
        "${SUPERUSER_CONN[@]}" -p "$LEADER_PORT" "$@"
}

# 6. Role, database, userlist, config.
if [ "$MODE" = citus ]; then
    # Patroni made database app (with Citus) on every group; the role is
    # made on the coordinator and Citus propagates it to the workers.
    psql_leader -d "$APP_DB" <<EOF
SET password_encryption = 'scram-sha-256';
SELECT 'CREATE ROLE $APP_USER LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$APP_USER')
\\gexec
ALTER ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD';
GRANT ALL ON SCHEMA public TO $APP_USER;
GRANT CREATE ON DATABASE $APP_DB TO $APP_USER;
EOF
    for _ in $(seq 1 150); do
        nodes=$(psql_leader -d "$APP_DB" -c "SELECT count(*) FROM pg_dist_node WHERE noderole = 'primary' AND groupid > 0")
        [ "$nodes" = 2 ] && break
        sleep 0.2
    done
    [ "$nodes" = 2 ] || die "the coordinator's pg_dist_node does not list both workers (see $BASE/patroni-coordinator.log)"
else
    psql_leader -d postgres <<EOF
SET password_encryption = 'scram-sha-256';
SELECT 'CREATE ROLE $APP_USER LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$APP_USER')
\\gexec
ALTER ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD';
SELECT 'CREATE DATABASE $APP_DB OWNER $APP_USER' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$APP_DB')
\\gexec
EOF
fi

umask 077
psql_leader -d postgres -c "SELECT '\"' || rolname || '\" \"' || rolpassword || '\"'
                 FROM pg_authid WHERE rolname = '$APP_USER'" >"$RUN/userlist.txt"
grep -q 'SCRAM-SHA-256' "$RUN/userlist.txt" || die "no SCRAM secret for $APP_USER in pg_authid"

# A self-signed certificate, so that sslmode=require works out of the box
# (use verify-full with a real CA in production: see README "TLS").
if [ ! -s "$RUN/server.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
        -subj "/CN=pgferry quickstart" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$RUN/server.key" -out "$RUN/server.crt" >/dev/null 2>&1 \
        || die "openssl could not make a self-signed certificate"
fi

case "$MODE" in
    static)
        topology="source = \"static\"
primary = \"127.0.0.1:$PG_PRIMARY_PORT\"
standbys = [\"127.0.0.1:$PG_STANDBY_PORT\"]"
        ;;
    patroni | citus)
        topology="source = \"etcd\"
endpoints = [\"127.0.0.1:$ETCD_PORT\"]
namespace = \"/service/\"
scope = \"$SCOPE\"
citus = $([ "$MODE" = citus ] && echo true || echo false)
check_user = \"$APP_USER\"
check_password = \"$APP_PASSWORD\"
check_dbname = \"$APP_DB\"
failover_hold_timeout = \"30s\""
        ;;
esac
citus_section=""
if [ "$MODE" = citus ]; then
    citus_section="
[citus]
database = \"$APP_DB\"
user = \"$APP_USER\"
password = \"$APP_PASSWORD\"
routing = \"shard\""
fi
cat >"$RUN/pgferry.toml" <<EOF
# Written by deploy/quickstart.sh; every key is described in deploy/pgferry.example.toml.
[listen]
rw = "0.0.0.0:$PGFERRY_RW_PORT"
ro = "0.0.0.0:$PGFERRY_RO_PORT"

[auth]
method = "scram-sha-256"
users_file = "$RUN/userlist.txt"
admin_users = ["$APP_USER"]

[tls]
client_tls = "allow"
cert_file = "$RUN/server.crt"
key_file = "$RUN/server.key"

[http]
listen = "127.0.0.1:$PGFERRY_HTTP_PORT"

[pool]
ro_fallback_to_primary = true

[topology]
$topology

[[user]]
name = "$APP_USER"
server_password = "$APP_PASSWORD"
$citus_section
EOF
"$PGFERRY" --check-config "$RUN/pgferry.toml" >/dev/null || die "pgferry rejected $RUN/pgferry.toml"

# 7. pgferry.
if alive "$BASE/pgferry.pid"; then
    say "pgferry is already running in the background (pid $(cat "$BASE/pgferry.pid")): stop it first to restart"
else
    for port in "$PGFERRY_RW_PORT" "$PGFERRY_RO_PORT" "$PGFERRY_HTTP_PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "port $port is already in use (another PostgreSQL or pgferry?); pick others with
    PGFERRY_RW_PORT=6432 PGFERRY_RO_PORT=6433 PGFERRY_HTTP_PORT=9404 deploy/quickstart.sh"
        fi
    done
fi

case "$MODE" in
    static) servers="PostgreSQL primary 127.0.0.1:$PG_PRIMARY_PORT, standby 127.0.0.1:$PG_STANDBY_PORT" ;;
    patroni) servers="etcd 127.0.0.1:$ETCD_PORT; Patroni members pg1 (PostgreSQL 127.0.0.1:$PG_PRIMARY_PORT) and pg2 (127.0.0.1:$PG_STANDBY_PORT), leader $(etcd_leader -)" ;;
    citus) servers="etcd 127.0.0.1:$ETCD_PORT; Patroni Citus groups: coordinator 127.0.0.1:$PG_PRIMARY_PORT, workers 127.0.0.1:$((PG_PRIMARY_PORT + 10)) and 127.0.0.1:$((PG_PRIMARY_PORT + 20))" ;;
esac
extra=""
case "$MODE" in
    patroni) extra="
  A switchover while a client writes (0 errors expected):
    deploy/quickstart.sh switchover" ;;
    citus) extra="
  Distribute a table, then keyed statements go straight to the owning worker:
    CREATE TABLE events (tenant_id bigint, id bigint, v text); SELECT create_distributed_table('events', 'tenant_id');
    SHOW CITUS;   (on the console below)" ;;
esac
cat >&2 <<EOF

  ready in $(($(date +%s) - STARTED)) s: $servers
  (data: $BASE; pgferry config: $RUN/pgferry.toml)

  Read-write (the current leader), over TLS:
    psql "host=127.0.0.1 port=$PGFERRY_RW_PORT user=$APP_USER dbname=$APP_DB password=$APP_PASSWORD sslmode=require"
  Read-only (a caught-up replica):
    psql "host=127.0.0.1 port=$PGFERRY_RO_PORT user=$APP_USER dbname=$APP_DB password=$APP_PASSWORD"
  Admin console (SHOW POOLS, SHOW TOPOLOGY, ...):
    psql "host=127.0.0.1 port=$PGFERRY_RW_PORT user=$APP_USER dbname=pgbouncer password=$APP_PASSWORD"
  Status page and metrics: http://127.0.0.1:$PGFERRY_HTTP_PORT/  http://127.0.0.1:$PGFERRY_HTTP_PORT/metrics
$extra
  deploy/quickstart.sh status | stop | reset

EOF
if alive "$BASE/pgferry.pid"; then
    exit 0
fi
if [ "$BACKGROUND" = yes ]; then
    # As the invoking user (it reads .run/, which may be root's).
    # A simple command, so that $! is pgferry itself (setsid execs it).
    cd "$RUN"
    # RUST_LIB_BACKTRACE=0: a startup error is its one line, not a backtrace.
    RUST_LIB_BACKTRACE=0 setsid "$PGFERRY" --config "$RUN/pgferry.toml" >>"$BASE/pgferry.log" 2>&1 </dev/null &
    echo $! >"$BASE/pgferry.pid"
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PGFERRY_RW_PORT") 2>/dev/null && break
        alive "$BASE/pgferry.pid" || break
        sleep 0.1
    done
    alive "$BASE/pgferry.pid" || {
        grep -E '^Error|ERROR' "$BASE/pgferry.log" | tail -n 5 >&2 || true
        tail -n 20 "$BASE/pgferry.log" >&2
        die "pgferry did not start"
    }
    say "pgferry runs in the background (pid $(cat "$BASE/pgferry.pid"), log $BASE/pgferry.log)"
    exit 0
fi
say "pgferry runs in the foreground: Ctrl-C stops it (deploy/quickstart.sh stop stops the rest)"
cd "$RUN"
RUST_LIB_BACKTRACE=0 exec "$PGFERRY" --config "$RUN/pgferry.toml"
