#!/usr/bin/env bash
# pgferry quickstart: a local PostgreSQL 15 primary + streaming standby and
# pgferry in front of them, on a Debian 12 machine.
#
#   deploy/quickstart.sh          install what is missing, build, start, run pgferry
#   deploy/quickstart.sh stop     stop the local PostgreSQL clusters
#   deploy/quickstart.sh reset    stop them and delete .run/ (start over)
#
# Run it as root or as a user who may sudo. Re-running it is safe: running
# clusters are reused. Everything it creates lives in .run/ (gitignored).
#
# Environment (defaults):
#   PG_PRIMARY_PORT=15432  PG_STANDBY_PORT=15433   PostgreSQL, on 127.0.0.1
#   PGFERRY_RW_PORT=5432   PGFERRY_RO_PORT=5433    pgferry, on 0.0.0.0
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN="$ROOT/.run"
PG_BIN=/usr/lib/postgresql/15/bin
PG_PRIMARY_PORT=${PG_PRIMARY_PORT:-15432}
PG_STANDBY_PORT=${PG_STANDBY_PORT:-15433}
PGFERRY_RW_PORT=${PGFERRY_RW_PORT:-5432}
PGFERRY_RO_PORT=${PGFERRY_RO_PORT:-5433}
APP_USER=app
APP_PASSWORD=app
APP_DB=app

say() { printf '\033[1mquickstart:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31mquickstart: %s\033[0m\n' "$*" >&2; exit 1; }

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
# The OS user PostgreSQL runs as (it refuses to run as root).
if [ "$(id -u)" -eq 0 ]; then
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

running() { # DATADIR -> 0 if a postmaster runs there
    [ -f "$1/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1
}

running_port() { # DATADIR -> the port of its running postmaster
    sed -n 4p "$1/postmaster.pid"
}

stop_clusters() {
    local base
    base=$(data_base)
    for node in standby primary; do
        if [ -d "$base/$node" ] && running "$base/$node"; then
            say "stopping the $node ($base/$node)"
            as_pg "$PG_BIN/pg_ctl" -D "$base/$node" -m fast -w -t 60 stop >/dev/null
        fi
    done
}

case "${1:-start}" in
    start) ;;
    stop)
        if [ -e "$RUN" ]; then stop_clusters; fi
        say "stopped"
        exit 0
        ;;
    reset)
        if [ -e "$RUN" ]; then
            stop_clusters
            base=$(data_base)
            if [ "$base" != "$RUN/pg" ]; then rm -rf "$base"; fi
            rm -rf "$RUN"
        fi
        say "removed .run/"
        exit 0
        ;;
    -h | --help | help)
        sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown command '$1' (start, stop, reset)" ;;
esac

# ---------------------------------------------------------------------------
# 1. Packages.
. "$ROOT/deploy/packages.sh"
mapfile -t missing < <(missing_pkgs "${PGFERRY_BUILD_PKGS[@]}")
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
fi
[ -x "$PG_BIN/initdb" ] || die "$PG_BIN/initdb not found: is postgresql-15 installed?"

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

# 4. The unprivileged OS user.
if [ "$(id -u)" -eq 0 ] && ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
    say "creating OS user $PG_OS_USER for PostgreSQL"
    useradd --system --create-home --shell /usr/sbin/nologin "$PG_OS_USER"
fi

# 5. Clusters.
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

psql_primary() {
    as_pg "$PG_BIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PRIMARY_PORT" \
        -U postgres -d postgres "$@"
}

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
for _ in $(seq 1 300); do
    streaming=$(psql_primary -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
    [ "$streaming" != 0 ] && break
    sleep 0.1
done
[ "$streaming" != 0 ] || say "warning: the standby is not streaming yet (see $BASE/standby.log)"

# 6. Role, database, userlist, config.
psql_primary <<EOF
SET password_encryption = 'scram-sha-256';
SELECT 'CREATE ROLE $APP_USER LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$APP_USER')
\\gexec
ALTER ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD';
SELECT 'CREATE DATABASE $APP_DB OWNER $APP_USER' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$APP_DB')
\\gexec
EOF

umask 077
psql_primary -c "SELECT '\"' || rolname || '\" \"' || rolpassword || '\"'
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

[topology]
source = "static"
primary = "127.0.0.1:$PG_PRIMARY_PORT"
standbys = ["127.0.0.1:$PG_STANDBY_PORT"]

[[user]]
name = "$APP_USER"
server_password = "$APP_PASSWORD"
EOF
"$PGFERRY" --check-config "$RUN/pgferry.toml" >/dev/null || die "pgferry rejected $RUN/pgferry.toml"

# 7. pgferry, in the foreground.
for port in "$PGFERRY_RW_PORT" "$PGFERRY_RO_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is already in use (another PostgreSQL or pgferry?); pick others with
    PGFERRY_RW_PORT=6432 PGFERRY_RO_PORT=6433 deploy/quickstart.sh"
    fi
done

cat >&2 <<EOF

  PostgreSQL primary  127.0.0.1:$PG_PRIMARY_PORT   standby 127.0.0.1:$PG_STANDBY_PORT   (data: $BASE)
  pgferry config      $RUN/pgferry.toml

  Connect through pgferry, read-write (primary), over TLS:
    psql "host=127.0.0.1 port=$PGFERRY_RW_PORT user=$APP_USER dbname=$APP_DB password=$APP_PASSWORD sslmode=require"
  read-only (standby):
    psql "host=127.0.0.1 port=$PGFERRY_RO_PORT user=$APP_USER dbname=$APP_DB password=$APP_PASSWORD"

  Ctrl-C stops pgferry; deploy/quickstart.sh stop stops PostgreSQL.

EOF
cd "$RUN"
exec "$PGFERRY" --config "$RUN/pgferry.toml"
