#!/bin/bash
# The seed cluster's PostgreSQL node: one entrypoint for standalone
# PostgreSQL, standalone Citus, and Patroni (Citus mode or not).
#
# Settings (environment; every *_PASSWORD also as *_PASSWORD_FILE, for
# Docker/Swarm secrets):
#   POSTGRES_PASSWORD       the postgres superuser's password (required)
#   POSTGRES_DB             the database Citus lives in / the app's (postgres)
#   APP_USER, APP_PASSWORD  a login role made at first start, owner of
#                           POSTGRES_DB (optional)
#   PGPORT                  PostgreSQL's only port (5432)
#   NODE_HOST               how other nodes and pgferry reach this one (hostname)
#   SSL_CERT_FILE, SSL_KEY_FILE, SSL_CA_FILE
#                           the node's certificate; a self-signed one is made
#                           at first start when none is given. TLS is always
#                           on, and TCP logins without it are refused.
#   CITUS_ENABLE=true       load Citus and create it in POSTGRES_DB
#   CITUS_ROLE              coordinator (default) | worker
#   CITUS_GROUP             Patroni's Citus group: 0 coordinator, 1.. workers
#   PATRONI_ENABLE=true     Patroni runs PostgreSQL (else PostgreSQL alone)
#   PATRONI_SCOPE           the cluster's name (required with Patroni)
#   PATRONI_NAME            this member's name (hostname)
#   PATRONI_ETCD3_HOSTS     etcd endpoints, host:port,host:port (required)
#   PATRONI_RESTAPI_PORT    Patroni's REST API (8008)
#   REPLICATION_PASSWORD    the replicator role's password (required with Patroni)
#   PATRONI_SYNCHRONOUS_MODE  true: synchronous replication (coordinator: FR-033)
#   PATRONI_TTL, PATRONI_LOOP_WAIT, PATRONI_RETRY_TIMEOUT  (20, 2, 5)
#   DCS_WAIT                seconds to wait for etcd before giving up (60)
#
# Commands: (none) start the node; healthcheck; post-bootstrap (Patroni's hook).
#
# First start initialises the data directory and Citus metadata; a restart
# finds PGDATA initialised and only starts. A first start that fails half-way
# leaves no half-made node: its data directory is removed, so the next start
# begins again from nothing.
set -Eeuo pipefail

die() {
    echo "pgferry-postgres: FATAL: $*" >&2
    exit 1
}
say() { echo "pgferry-postgres: $*" >&2; }

# secret NAME -> the value of NAME, or of the file named by NAME_FILE.
secret() {
    local name=$1 file_var="${1}_FILE"
    local value=${!name:-} file=${!file_var:-}
    if [ -n "$value" ] && [ -n "$file" ]; then
        die "both $name and $file_var are set: choose one"
    fi
    if [ -n "$file" ]; then
        [ -r "$file" ] || die "$file_var=$file is not readable"
        value=$(<"$file")
    fi
    printf '%s' "$value"
}

truthy() {
    case "${1,,}" in
        1 | true | yes | on) return 0 ;;
        '' | 0 | false | no | off) return 1 ;;
        *) die "'$1' is not a boolean (true/false)" ;;
    esac
}

PGDATA=${PGDATA:-/var/lib/postgresql/data/pgdata}
PGPORT=${PGPORT:-5432}
POSTGRES_DB=${POSTGRES_DB:-postgres}
NODE_HOST=${NODE_HOST:-$(hostname)}
STATE_DIR=$(dirname "$PGDATA")
TLS_DIR=$STATE_DIR/tls
# Present only while a first start is under way (outside PGDATA, which
# initdb wants empty): finding it at start means that start did not finish.
INITIALISING=$STATE_DIR/pgferry-initialising
export PGPASSFILE=$STATE_DIR/pgpass

# --- commands that are not "start" -----------------------------------------
case "${1:-}" in
    healthcheck)
        if truthy "${PATRONI_ENABLE:-false}"; then
            # Patroni's liveness, not pg_isready: a replica still copying
            # its base backup, or a busy primary, is alive and must not be
            # restarted by the orchestrator (that would be a failover).
            exec timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" &&
                printf "GET /liveness HTTP/1.0\r\n\r\n" >&3 && head -n1 <&3 | grep -q " 200 "' _ "${PATRONI_RESTAPI_PORT:-8008}"
        fi
        exec pg_isready -q -h 127.0.0.1 -p "$PGPORT" -t 2
        ;;
    post-bootstrap)
        # Patroni calls this once, on the member that initialised the cluster
        # (its connection string argument is not needed: the local socket
        # with peer authentication is the superuser's way in).
        app_user=${APP_USER:-}
        app_password=$(secret APP_PASSWORD)
        psql_() { psql -X -v ON_ERROR_STOP=1 -q -h /var/run/postgresql -p "$PGPORT" -U postgres "$@"; }
        if [ -n "$app_user" ]; then
            psql_ -d postgres -v user="$app_user" -v pass="$app_password" <<'SQL'
SET password_encryption = 'scram-sha-256';
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'pass')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
SQL
        fi
        if truthy "${CITUS_ENABLE:-false}"; then
            # Patroni's Citus mode makes POSTGRES_DB itself, after this hook,
            # from template1: a grant on template1's public schema is how the
            # app role gets to create tables there.
            if [ -n "$app_user" ]; then
                psql_ -d template1 -v user="$app_user" <<<"GRANT CREATE ON SCHEMA public TO :\"user\""
            fi
        elif [ "$POSTGRES_DB" != postgres ]; then
            psql_ -d postgres -v db="$POSTGRES_DB" -v owner="${app_user:-postgres}" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
        fi
        exit 0
        ;;
    '' | start) ;;
    *) exec "$@" ;;
esac

# --- validate everything before anything is made ---------------------------
[[ $PGPORT =~ ^[0-9]+$ ]] || die "PGPORT='$PGPORT' is not a port number"
SUPERUSER_PASSWORD=$(secret POSTGRES_PASSWORD)
[ -n "$SUPERUSER_PASSWORD" ] || die "POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) is required: TCP logins need a password"
APP_PASSWORD_VALUE=$(secret APP_PASSWORD)
if [ -n "${APP_USER:-}" ] && [ -z "$APP_PASSWORD_VALUE" ]; then
    die "APP_USER=$APP_USER needs APP_PASSWORD (or APP_PASSWORD_FILE)"
fi

CITUS=no
if truthy "${CITUS_ENABLE:-false}"; then
    CITUS=yes
    [ -f /usr/lib/postgresql/15/lib/citus.so ] || die "CITUS_ENABLE=true but this image has no Citus (citus.so missing)"
    CITUS_ROLE=${CITUS_ROLE:-coordinator}
    case "$CITUS_ROLE" in
        coordinator) CITUS_GROUP=${CITUS_GROUP:-0} ;;
        worker) ;;
        *) die "CITUS_ROLE='$CITUS_ROLE': use coordinator or worker" ;;
    esac
fi

PATRONI=no
if truthy "${PATRONI_ENABLE:-false}"; then
    PATRONI=yes
    [ -n "${PATRONI_SCOPE:-}" ] || die "PATRONI_ENABLE=true needs PATRONI_SCOPE (the cluster's name)"
    [ -n "${PATRONI_ETCD3_HOSTS:-}" ] || die "PATRONI_ENABLE=true needs PATRONI_ETCD3_HOSTS (etcd's host:port list)"
    REPLICATION_PASSWORD_VALUE=$(secret REPLICATION_PASSWORD)
    [ -n "$REPLICATION_PASSWORD_VALUE" ] || die "PATRONI_ENABLE=true needs REPLICATION_PASSWORD (or REPLICATION_PASSWORD_FILE)"
    PATRONI_NAME=${PATRONI_NAME:-$(hostname)}
    PATRONI_RESTAPI_PORT=${PATRONI_RESTAPI_PORT:-8008}
    [[ $PATRONI_RESTAPI_PORT =~ ^[0-9]+$ ]] || die "PATRONI_RESTAPI_PORT='$PATRONI_RESTAPI_PORT' is not a port number"
    if [ "$CITUS" = yes ]; then
        [[ ${CITUS_GROUP:-} =~ ^[0-9]+$ ]] || die "CITUS_ROLE=$CITUS_ROLE with Patroni needs CITUS_GROUP (0 for the coordinator, 1.. for workers)"
        if [ "$CITUS_ROLE" = coordinator ] && [ "$CITUS_GROUP" != 0 ]; then
            die "CITUS_ROLE=coordinator needs CITUS_GROUP=0 (got $CITUS_GROUP)"
        fi
        if [ "$CITUS_ROLE" = worker ] && [ "$CITUS_GROUP" = 0 ]; then
            die "CITUS_ROLE=worker needs CITUS_GROUP 1 or more (group 0 is the coordinator)"
        fi
        [ "$POSTGRES_DB" != postgres ] || die "Citus with Patroni needs POSTGRES_DB other than 'postgres' (Patroni's citus.database)"
    fi
    # etcd must answer before Patroni starts, so that a wrong endpoint is a
    # clear error here and not a node that waits forever half-started.
    wait=${DCS_WAIT:-60}
    deadline=$((SECONDS + wait))
    while :; do
        reachable=no
        IFS=, read -r -a hosts <<<"$PATRONI_ETCD3_HOSTS"
        for hp in "${hosts[@]}"; do
            [[ $hp =~ ^[^:]+:[0-9]+$ ]] || die "PATRONI_ETCD3_HOSTS entry '$hp' is not host:port"
            if timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "${hp%:*}" "${hp##*:}" 2>/dev/null; then
                reachable=yes
                break
            fi
        done
        [ "$reachable" = yes ] && break
        [ $SECONDS -lt $deadline ] || die "no etcd endpoint of PATRONI_ETCD3_HOSTS=$PATRONI_ETCD3_HOSTS answered within ${wait}s (DCS_WAIT)"
        sleep 1
    done
fi

# --- files every mode needs ------------------------------------------------
umask 077
mkdir -p "$TLS_DIR"
if [ -n "${SSL_CERT_FILE:-}" ] || [ -n "${SSL_KEY_FILE:-}" ]; then
    [ -r "${SSL_CERT_FILE:-}" ] && [ -r "${SSL_KEY_FILE:-}" ] || die "SSL_CERT_FILE and SSL_KEY_FILE must both name readable files"
    # Copied so that the key has the owner and mode PostgreSQL insists on,
    # whatever the mounted secret's.
    cp "$SSL_CERT_FILE" "$TLS_DIR/server.crt"
    cp "$SSL_KEY_FILE" "$TLS_DIR/server.key"
    if [ -n "${SSL_CA_FILE:-}" ]; then cp "$SSL_CA_FILE" "$TLS_DIR/ca.crt"; fi
elif [ ! -s "$TLS_DIR/server.crt" ]; then
    say "no SSL_CERT_FILE: making a self-signed certificate for $NODE_HOST"
    san="DNS:$NODE_HOST,DNS:localhost,IP:127.0.0.1"
    [[ $NODE_HOST =~ ^[0-9.]+$ ]] && san="IP:$NODE_HOST,DNS:localhost,IP:127.0.0.1"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
        -subj "/CN=$NODE_HOST" -addext "subjectAltName=$san" \
        -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.crt" 2>/dev/null \
        || die "openssl could not make a certificate"
fi
chmod 0600 "$TLS_DIR/server.key"
ca_line=""
[ -s "$TLS_DIR/ca.crt" ] && ca_line="ssl_ca_file = '$TLS_DIR/ca.crt'"

# Node-to-node connections (Citus, pg_rewind) log in with these (pgpass
# fields escape \ and :).
pgpass_field() { local v=${1//\\/\\\\}; printf '%s' "${v//:/\\:}"; }
{
    echo "*:*:*:postgres:$(pgpass_field "$SUPERUSER_PASSWORD")"
    if [ -n "${APP_USER:-}" ]; then echo "*:*:*:$(pgpass_field "$APP_USER"):$(pgpass_field "$APP_PASSWORD_VALUE")"; fi
} >"$PGPASSFILE"
chmod 0600 "$PGPASSFILE"

citus_params() {
    # The indentation is the caller's.
    [ "$CITUS" = yes ] || return 0
    echo "citus.node_conninfo: 'sslmode=require'"
    echo "citus.local_hostname: '$NODE_HOST'"
    echo "citus.enable_statistics_collection: 'off'"
}

# --- Patroni ---------------------------------------------------------------
if [ "$PATRONI" = yes ]; then
    citus_section=""
    if [ "$CITUS" = yes ]; then
        citus_section="citus:
  group: $CITUS_GROUP
  database: $POSTGRES_DB"
    fi
    sync=false
    truthy "${PATRONI_SYNCHRONOUS_MODE:-false}" && sync=true
    cat >"$STATE_DIR/patroni.yml" <<EOF
# Written by the entrypoint at every start from the environment.
scope: $PATRONI_SCOPE
namespace: /service/
name: $PATRONI_NAME
restapi:
  listen: 0.0.0.0:$PATRONI_RESTAPI_PORT
  connect_address: $NODE_HOST:$PATRONI_RESTAPI_PORT
etcd3:
  hosts: $PATRONI_ETCD3_HOSTS
$citus_section
bootstrap:
  dcs:
    ttl: ${PATRONI_TTL:-20}
    loop_wait: ${PATRONI_LOOP_WAIT:-2}
    retry_timeout: ${PATRONI_RETRY_TIMEOUT:-5}
    maximum_lag_on_failover: 1048576
    synchronous_mode: $sync
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        wal_log_hints: 'on'
        max_connections: ${MAX_CONNECTIONS:-200}
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 128MB
        password_encryption: scram-sha-256
  initdb:
  - encoding: UTF8
  - locale: C
  - data-checksums
  post_bootstrap: /usr/local/bin/pgferry-postgres-entrypoint post-bootstrap
postgresql:
  listen: 0.0.0.0:$PGPORT
  connect_address: $NODE_HOST:$PGPORT
  data_dir: $PGDATA
  bin_dir: /usr/lib/postgresql/15/bin
  pgpass: $STATE_DIR/pgpass.patroni
  use_unix_socket: true
  basebackup:
  - checkpoint: fast
  # The passwords come from PATRONI_*_PASSWORD in Patroni's environment (set
  # below): never written to this file, never quoted into YAML.
  authentication:
    superuser: {username: postgres, sslmode: require}
    replication: {username: replicator, sslmode: require}
    rewind: {username: postgres, sslmode: require}
  pg_hba:
  - local all all peer
  - hostssl replication replicator 0.0.0.0/0 scram-sha-256
  - hostssl replication replicator ::/0 scram-sha-256
  - hostssl all all 0.0.0.0/0 scram-sha-256
  - hostssl all all ::/0 scram-sha-256
  - hostnossl all all 0.0.0.0/0 reject
  - hostnossl all all ::/0 reject
  parameters:
    unix_socket_directories: '/var/run/postgresql'
    ssl: 'on'
    ssl_cert_file: '$TLS_DIR/server.crt'
    ssl_key_file: '$TLS_DIR/server.key'
    ${ca_line/ = /: }
    ssl_min_protocol_version: TLSv1.2
    shared_buffers: ${SHARED_BUFFERS:-128MB}
$(citus_params | sed 's/^/    /')
EOF
    chmod 0600 "$STATE_DIR/patroni.yml"
    say "starting Patroni member $PATRONI_NAME of $PATRONI_SCOPE (PostgreSQL $NODE_HOST:$PGPORT, REST :$PATRONI_RESTAPI_PORT${CITUS_GROUP:+, Citus group $CITUS_GROUP})"
    # Patroni, as PID 1, reaps its children and, on SIGTERM (the image's stop
    # signal; it ignores SIGINT as PID 1), stops PostgreSQL and releases the
    # leader key, so that a standby takes over at once.
    export PATRONI_SUPERUSER_USERNAME=postgres PATRONI_SUPERUSER_PASSWORD=$SUPERUSER_PASSWORD
    export PATRONI_REPLICATION_USERNAME=replicator PATRONI_REPLICATION_PASSWORD=$REPLICATION_PASSWORD_VALUE
    export PATRONI_REWIND_USERNAME=postgres PATRONI_REWIND_PASSWORD=$SUPERUSER_PASSWORD
    exec patroni "$STATE_DIR/patroni.yml"
fi

# --- standalone PostgreSQL / Citus -----------------------------------------
write_config() {
    cat >"$PGDATA/pgferry-node.conf" <<EOF
# Written by the entrypoint at every start from the environment.
listen_addresses = '*'
port = $PGPORT
unix_socket_directories = '/var/run/postgresql'
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = '$TLS_DIR/server.crt'
ssl_key_file = '$TLS_DIR/server.key'
$ca_line
ssl_min_protocol_version = 'TLSv1.2'
max_connections = ${MAX_CONNECTIONS:-200}
shared_buffers = ${SHARED_BUFFERS:-128MB}
EOF
    if [ "$CITUS" = yes ]; then
        echo "shared_preload_libraries = 'citus'" >>"$PGDATA/pgferry-node.conf"
        citus_params | sed 's/: / = /' >>"$PGDATA/pgferry-node.conf"
    fi
    grep -q "^include_if_exists = 'pgferry-node.conf'" "$PGDATA/postgresql.conf" \
        || echo "include_if_exists = 'pgferry-node.conf'" >>"$PGDATA/postgresql.conf"
    cat >"$PGDATA/pg_hba.conf" <<'EOF'
# Written by the entrypoint: local peer, TCP only over TLS with SCRAM.
local all all peer
hostssl all all 0.0.0.0/0 scram-sha-256
hostssl all all ::/0 scram-sha-256
hostnossl all all 0.0.0.0/0 reject
hostnossl all all ::/0 reject
EOF
}

first_start() {
    say "first start: initialising $PGDATA"
    : >"$INITIALISING"
    local pwfile
    pwfile=$(mktemp)
    printf '%s\n' "$SUPERUSER_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" -U postgres --pwfile="$pwfile" -E UTF8 --locale=C --data-checksums \
        --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    write_config
    pg_ctl -D "$PGDATA" -w -t 60 -o "-c listen_addresses=''" start >&2
    local psql_=(psql -X -v ON_ERROR_STOP=1 -q -h /var/run/postgresql -p "$PGPORT" -U postgres)
    if [ -n "${APP_USER:-}" ]; then
        "${psql_[@]}" -d postgres -v user="$APP_USER" -v pass="$APP_PASSWORD_VALUE" <<'SQL'
SET password_encryption = 'scram-sha-256';
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'pass') \gexec
SQL
    fi
    if [ "$POSTGRES_DB" != postgres ]; then
        "${psql_[@]}" -d postgres -v db="$POSTGRES_DB" -v owner="${APP_USER:-postgres}" \
            <<<"SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner') \\gexec"
    fi
    if [ "$CITUS" = yes ]; then
        "${psql_[@]}" -d "$POSTGRES_DB" -c "CREATE EXTENSION citus"
        if [ "$CITUS_ROLE" = coordinator ]; then
            # Ready to add workers: SELECT citus_add_node('worker', 5432).
            "${psql_[@]}" -d "$POSTGRES_DB" -v host="$NODE_HOST" -v port="$PGPORT" \
                <<<"SELECT citus_set_coordinator_host(:'host', :'port'::int)" >/dev/null
        fi
    fi
    pg_ctl -D "$PGDATA" -w -t 60 -m fast stop >/dev/null
    rm -f "$INITIALISING"
    say "initialised (Citus: $CITUS${CITUS_ROLE:+, $CITUS_ROLE})"
}

if [ -e "$INITIALISING" ]; then
    # A first start of this entrypoint's that did not finish: nothing was
    # ever served from it. (Never a directory without that file: a Patroni
    # member's, a restored backup, a volume from elsewhere.)
    say "removing the unfinished data directory of an interrupted first start"
    pg_ctl -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "${PGDATA:?}"
    rm -f "$INITIALISING"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    trap 'pg_ctl -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true; rm -rf "${PGDATA:?}"; rm -f "$INITIALISING"; die "first start failed: the data directory was removed, the next start begins again"' ERR
    first_start
    trap - ERR
else
    say "data directory initialised before: starting (no metadata initialisation)"
    write_config
fi
say "PostgreSQL on $NODE_HOST:$PGPORT (TLS required for TCP logins)"
# The image's stop signal is SIGTERM (Patroni's). For PostgreSQL alone it
# would mean a smart shutdown, which waits for every client, pgferry's pooled
# connections included: forward it as SIGINT, a fast shutdown (open
# transactions rolled back, a clean checkpoint).
postgres -D "$PGDATA" &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null || true' TERM INT
while :; do
    status=0
    wait "$pid" || status=$?
    kill -0 "$pid" 2>/dev/null || break
done
exit "$status"
