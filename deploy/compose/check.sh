#!/usr/bin/env bash
# CI's container step: builds the images, brings the compose stack up (etcd
# x3, Citus coordinator + 2 worker groups under Patroni, pgferry x2,
# Prometheus), and checks it as an operator would:
#   - a write and a read through pgferry (read-write port, then a replica
#     through the read-only port), SHOW CITUS;
#   - the images' HEALTHCHECKs, Prometheus scraping both pgferrys with the
#     alert rules loaded;
#   - a Patroni switchover of the coordinator group and of a worker group
#     while pgbench writes through pgferry: 0 failed, every row there;
#   - a graceful stop of the coordinator's leader: a quick handover, and the
#     node comes back without a second initialisation; pgferry drains on SIGTERM;
#   - the PostgreSQL image refuses wrong Citus/Patroni settings before it
#     starts anything;
# then takes it all down. Prints each step's time; the whole within 10 min.
#
# Env: KEEP=1 leaves the stack up; PGFERRY_BIN as for build.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
T0=$SECONDS
PATH=/usr/lib/postgresql/15/bin:$PATH
say() { printf '== compose check [%3ds]: %s\n' $((SECONDS - T0)) "$*" >&2; }
die() {
    echo "compose check: FAILED: $*" >&2
    exit 1
}

# The seed stack is a Citus formation: without a Citus build for the image
# (Debian has no package; ../shared/citus/ here) there is nothing to check.
if [ -z "${CITUS_TARBALL:-}" ] && ! ls "$ROOT"/../shared/citus/citus-*-pg15-debian12-amd64.tar.xz >/dev/null 2>&1; then
    say "SKIPPED: no Citus build for the PostgreSQL image (../shared/citus/ or CITUS_TARBALL)"
    exit 0
fi

# 1. Tools: podman, buildah, runc, debootstrap from Debian; podman-compose
#    1.6 from PyPI (Debian's 1.0.3 always makes a bridge network).
pkgs=()
for p in podman buildah runc debootstrap python3-venv; do
    [ "$(dpkg-query -W -f '${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || pkgs+=("$p")
done
if [ ${#pkgs[@]} -gt 0 ]; then
    say "apt-get install ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null
fi
. "$ROOT/deploy/containers/podman-env.sh"
VENV=$PGFERRY_PODMAN_DIR/venv
if [ ! -x "$VENV/bin/podman-compose" ]; then
    say "podman-compose 1.6.0 into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'podman-compose==1.6.0'
fi
PC=("$VENV/bin/podman-compose" -f "$HERE/compose.yaml" -p pgferry-check)
LOGS=$PGFERRY_PODMAN_DIR/logs
mkdir -p "$LOGS"

# 2. Images and secrets.
say "building images"
"$ROOT/deploy/containers/build.sh" all >$LOGS/build.log 2>&1 \
    || { tail -n 30 $LOGS/build.log >&2; die "image build (log: $LOGS/build.log)"; }
grep '== build.sh: localhost/' $LOGS/build.log | sed 's/^== build.sh: /   image /' >&2
"$HERE/make-secrets.sh" >/dev/null

# 3. Ports: the compose defaults moved by one offset until all are free.
PORT_VARS=(ETCD1_PORT=12379 ETCD1_PEER_PORT=12380 ETCD2_PORT=12479 ETCD2_PEER_PORT=12480
    ETCD3_PORT=12579 ETCD3_PEER_PORT=12580
    COORD1_PORT=15432 COORD1_REST_PORT=18001 COORD2_PORT=15433 COORD2_REST_PORT=18002
    W1A_PORT=15442 W1A_REST_PORT=18011 W1B_PORT=15443 W1B_REST_PORT=18012
    W2A_PORT=15452 W2A_REST_PORT=18021 W2B_PORT=15453 W2B_REST_PORT=18022
    PGFERRY1_RW_PORT=16432 PGFERRY1_RO_PORT=16433 PGFERRY1_HTTP_PORT=18404
    PGFERRY2_RW_PORT=16442 PGFERRY2_RO_PORT=16443 PGFERRY2_HTTP_PORT=18414
    PROMETHEUS_PORT=19090)
# pod ARGS...: a podman call whose output only matters when it fails.
pod() {
    local out
    out=$(podman "$@" 2>&1) || die "podman $*: $(grep -v systemd <<<"$out")"
}
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
offset=""
for try in 0 100 200 300 400 500 600 700 800 900; do
    busy=no
    for kv in "${PORT_VARS[@]}"; do
        if in_use $((${kv#*=} + try)); then busy=yes; break; fi
    done
    if [ $busy = no ]; then offset=$try; break; fi
done
[ -n "$offset" ] || die "no free set of ports (tried offsets 0..900 from compose.yaml's defaults)"
for kv in "${PORT_VARS[@]}"; do export "${kv%=*}=$((${kv#*=} + offset))"; done
export PATRONI_SCOPE=seed-check
say "ports: compose defaults + $offset"

down() {
    if [ -n "${KEEP:-}" ]; then
        say "KEEP=1: the stack stays up (${PC[*]} down -v)"
        return
    fi
    "${PC[@]}" down -v -t 10 >/dev/null 2>&1 || true
}
bench=
trap 'status=$?; [ -z "$bench" ] || kill "$bench" 2>/dev/null || true; if [ $status != 0 ]; then for c in coord1 coord2 w1a pgferry1; do echo "--- $c" >&2; podman logs --tail 30 pgferry-check_${c}_1 2>&1 | cut -c1-300 >&2 || true; done; fi; down' EXIT
"${PC[@]}" down -v -t 5 >/dev/null 2>&1 || true

# 4. Up, and the first write through pgferry.
say "compose up"
up_at=$SECONDS
"${PC[@]}" up -d >$LOGS/compose-up.log 2>&1 || { cat $LOGS/compose-up.log >&2; die "compose up"; }
export PGPASSWORD
PGPASSWORD=$(cat "$HERE/secrets/app_password")
ferry() { # PORT SQL...
    local port=$1
    shift
    psql -X -A -t -q -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$port user=app dbname=app sslmode=require connect_timeout=5" "$@"
}
declare -A ready
for _ in $(seq 1 120); do
    for m in COORD1 COORD2 W1A W1B W2A W2B; do
        port_var=${m}_PORT
        if [ -z "${ready[$m]:-}" ] && pg_isready -q -h 127.0.0.1 -p "${!port_var}" -t 1; then
            ready[$m]=$((SECONDS - up_at))
        fi
    done
    workers=$(ferry "$PGFERRY1_RW_PORT" -c "SELECT count(*) FROM pg_dist_node WHERE noderole = 'primary' AND groupid > 0" 2>/dev/null || true)
    [ "$workers" = 2 ] && [ ${#ready[@]} = 6 ] && break
    sleep 1
done
[ "${workers:-}" = 2 ] || die "the coordinator never listed both worker groups through pgferry"
say "stack ready: a query through pgferry after $((SECONDS - up_at)) s; PostgreSQL members accepting connections after (s): $(for m in "${!ready[@]}"; do printf '%s=%s ' "${m,,}" "${ready[$m]}"; done)"
for m in "${!ready[@]}"; do
    [ "${ready[$m]}" -le 60 ] || die "${m,,} took ${ready[$m]} s to start (PR-001: 60 s)"
done

# 5. Write and read.
ferry "$PGFERRY1_RW_PORT" <<'SQL'
CREATE TABLE events (tenant_id bigint, v text);
SELECT create_distributed_table('events', 'tenant_id');
INSERT INTO events (tenant_id, v) SELECT g % 50, 'seed' FROM generate_series(1, 1000) g;
-- A bigserial id: its INSERTs draw the sequence on the coordinator, so
-- pgferry sends them there (events' go straight to the owning worker).
CREATE TABLE ledger (tenant_id bigint, id bigserial, v text);
SELECT create_distributed_table('ledger', 'tenant_id', colocate_with => 'events');
SQL
[ "$(ferry "$PGFERRY1_RW_PORT" -c 'SELECT count(*) FROM events')" = 1000 ] || die "write through pgferry1"
[ "$(ferry "$PGFERRY1_RW_PORT" -c 'SELECT count(*) FROM events WHERE tenant_id = 7')" = 20 ] || die "keyed read through pgferry1"
for _ in $(seq 1 50); do
    replica=$(ferry "$PGFERRY2_RO_PORT" -c 'SELECT pg_is_in_recovery(), count(*) FROM events' 2>/dev/null || true)
    [ "$replica" = "t|1000" ] && break
    sleep 0.2
done
[ "$replica" = "t|1000" ] || die "read through pgferry2's read-only port: got '$replica', want a replica with 1000 rows"
# pgferry sees new Citus metadata at its next fingerprint check
# (refresh_interval, 2 s by default): a SHOW CITUS right after the
# create_distributed_table may predate it (failed stop 20's CI), so poll.
for _ in $(seq 1 40); do
    routed=$(PGPASSWORD=$(cat "$HERE/secrets/admin_password") psql -X -A -t "host=127.0.0.1 port=$PGFERRY1_RW_PORT user=admin dbname=pgbouncer sslmode=require" -c 'SHOW CITUS' | grep -c '^table|public.events|hash|tenant_id|32' || true)
    [ "$routed" = 1 ] && break
    sleep 0.25
done
# The application's role is not an admin: the console refuses it.
if psql -X -A -t "host=127.0.0.1 port=$PGFERRY1_RW_PORT user=app dbname=pgbouncer sslmode=require" -c 'SHOW POOLS' >/dev/null 2>&1; then
    die "the app role reached the admin console"
fi
# Client TLS is required.
if psql -X -A -t "host=127.0.0.1 port=$PGFERRY1_RW_PORT user=app dbname=app sslmode=disable" -c 'SELECT 1' >/dev/null 2>&1; then
    die "pgferry took a login without TLS"
fi
[ "$routed" = 1 ] || die "SHOW CITUS on pgferry1 does not list public.events (32 hash shards)"
say "write (1000 rows, distributed) and reads (keyed, replica via the read-only port) through pgferry: ok"

# 6. Health checks and Prometheus.
# (podman here has no systemd to run HEALTHCHECKs on a timer: run them; a
# check may fail now and then, as Docker's retries allow, but not 3 in a row)
for c in pgferry1 pgferry2 coord1 w1a etcd1; do
    fails=0
    until podman healthcheck run "pgferry-check_${c}_1" >/dev/null 2>&1; do
        fails=$((fails + 1))
        [ $fails -lt 3 ] || die "HEALTHCHECK of $c failed 3 times: $(podman inspect --format '{{json .State.Health}}' "pgferry-check_${c}_1")"
        sleep 1
    done
done
for _ in $(seq 1 60); do
    up=$(curl -s "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=sum(up%7Bjob%3D%22pgferry%22%7D)" \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' 2>/dev/null || true)
    [ "$up" = 2 ] && break
    sleep 1
done
[ "$up" = 2 ] || die "Prometheus does not scrape both pgferrys (sum(up) = '${up:-none}')"
grep -q '"name":"PgferryLeaderMissing"' <<<"$(curl -s "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/rules")" \
    || die "Prometheus has not loaded pgferry's alert rules"
metrics=$(curl -s "http://127.0.0.1:$PGFERRY1_HTTP_PORT/metrics")
grep -q '^pgferry_topology_leader_confirmed 1' <<<"$metrics" || die "pgferry1's /metrics has no confirmed coordinator leader"
leaders=$(grep -c '^pgferry_citus_group_leader{group="[0-9]"} 1' <<<"$metrics" || true)
[ "$leaders" = 2 ] || die "pgferry1's /metrics shows $leaders Citus worker group leaders, want 2"
say "healthchecks healthy; Prometheus scrapes 2 pgferrys, alert rules loaded; /metrics: coordinator and 2 worker group leaders"

# 7. Switchovers under load: the coordinator group, then worker group 1.
patronictl() { podman exec "pgferry-check_$1_1" patronictl -c /var/lib/postgresql/data/patroni.yml "${@:2}"; }
# The cluster as any running member sees it: the member we stop below may be
# coord1 (it depends on which member won the first election).
cluster_json() {
    local m
    for m in coord1 coord2 w1a w1b w2a w2b; do
        patronictl "$m" list -f json 2>/dev/null && return 0
    done
    echo '[]'
}
leader_of() { # GROUP -> member name
    cluster_json | python3 -c "import json,sys; print(next((m['Member'] for m in json.load(sys.stdin) if m['Group']==$1 and m['Role']=='Leader'), ''))"
}
other() { # GROUP LEADER -> the group's other member
    case "$1:$2" in
        0:coord1) echo coord2 ;; 0:coord2) echo coord1 ;;
        1:w1a) echo w1b ;; 1:w1b) echo w1a ;;
        *) return 1 ;;
    esac
}
count_rows() { ferry "$PGFERRY1_RW_PORT" -c 'SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM ledger)'; }
before=$(count_rows)
script=$(mktemp)
# Two transactions a run: one routed to its worker, one via the coordinator.
cat >"$script" <<'EOF'
\set t random(1, 50)
INSERT INTO events (tenant_id, v) VALUES (:t, 'bench');
INSERT INTO ledger (tenant_id, v) VALUES (:t, 'bench');
EOF
say "pgbench: 4 clients inserting through pgferry1 for 24 s; switchovers at 4 s (coordinator) and 14 s (worker group 1)"
pgbench -n -c 4 -j 2 -T 24 -P 4 -f "$script" \
    "host=127.0.0.1 port=$PGFERRY1_RW_PORT user=app dbname=app sslmode=require" >$LOGS/compose-pgbench.log 2>&1 &
bench=$!
for step in "4 0" "10 1"; do
    read -r wait group <<<"$step"
    sleep "$wait"
    from=$(leader_of "$group")
    to=$(other "$group" "$from") || die "group $group has no known leader ($from)"
    t=$SECONDS
    patronictl coord1 switchover --group "$group" --leader "$from" --candidate "$to" --force >$LOGS/switchover-$group.log 2>&1 \
        || { cat $LOGS/switchover-$group.log >&2; die "patronictl switchover (group $group)"; }
    for _ in $(seq 1 100); do
        [ "$(leader_of "$group")" = "$to" ] && break
        sleep 0.2
    done
    [ "$(leader_of "$group")" = "$to" ] || die "group $group: $to did not become leader"
    say "group $group: switchover $from -> $to done in $((SECONDS - t)) s"
done
status=0
wait "$bench" || status=$?
bench=
rm -f "$script"
after=$(count_rows)
failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' $LOGS/compose-pgbench.log)
processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' $LOGS/compose-pgbench.log)
grep -E '^progress|^latency|^tps' $LOGS/compose-pgbench.log | sed 's/^/   /' >&2
say "pgbench: exit $status, ${processed:-?} script runs (2 inserts each, routed and via the coordinator), ${failed:-?} failed; rows added $((after - before))"
[ "$status" = 0 ] && [ "${failed:-1}" = 0 ] && [ "$((after - before))" = "$((2 * ${processed:-0}))" ] \
    || die "the switchovers were not a non-event for the client (log: $LOGS/compose-pgbench.log)"
# ledger's INSERTs belong on the coordinator: held through its switchover,
# never run on a worker (a worker draws the sequence from its own range,
# group << 48).
on_worker=$(ferry "$PGFERRY1_RW_PORT" -c "SELECT count(*) FROM ledger WHERE id >= (1::bigint << 48)")
[ "$on_worker" = 0 ] || die "$on_worker ledger rows were inserted on a worker (coordinator-bound transactions ran on a worker during the switchover)"

# 8. A graceful stop of the coordinator's leader: Patroni hands the leader
#    key over at once (no TTL wait), pgferry follows, writes go on; the node
#    starts again as a replica and is not initialised a second time.
old=$(leader_of 0)
new=$(other 0 "$old")
# With synchronous_mode only the synchronous standby may take over: after
# the switchover above, wait until the demoted member is that again (what
# an operator checks before stopping a leader: patronictl list).
role_of() { # MEMBER -> its Role in patronictl list
    cluster_json | python3 -c "import json,sys; print(next((m['Role'] for m in json.load(sys.stdin) if m['Member']=='$1'), ''))"
}
for _ in $(seq 1 120); do
    [ "$(role_of "$new")" = "Sync Standby" ] && break
    sleep 0.5
done
[ "$(role_of "$new")" = "Sync Standby" ] || die "$new did not become the coordinator's synchronous standby"
t=$SECONDS
pod stop -t 30 "pgferry-check_${old}_1"
stopped=$((SECONDS - t))
code=$(podman inspect --format '{{.State.ExitCode}}' "pgferry-check_${old}_1")
[ "$code" = 0 ] || die "$old exited $code when stopped (want a clean Patroni shutdown)"
[ "$stopped" -lt 20 ] || die "$old took $stopped s to stop (SIGTERM did not reach Patroni?)"
for _ in $(seq 1 100); do
    [ "$(leader_of 0)" = "$new" ] && break
    sleep 0.2
done
[ "$(leader_of 0)" = "$new" ] || die "$new did not take over after $old stopped"
ferry "$PGFERRY1_RW_PORT" -c "INSERT INTO events (tenant_id, v) VALUES (1, 'after the stop')" >/dev/null \
    || die "a write through pgferry after the coordinator leader stopped"
taken=$((SECONDS - t))
pod start "pgferry-check_${old}_1"
port_var=${old^^}_PORT
for _ in $(seq 1 120); do pg_isready -q -h 127.0.0.1 -p "${!port_var}" -t 1 && break; sleep 0.5; done
pg_isready -q -h 127.0.0.1 -p "${!port_var}" || die "$old did not come back after its stop"
# podman logs holds both runs: the first start's bootstrap (a new cluster or
# a copy of the leader), and no second.
boots=$(podman logs "pgferry-check_${old}_1" 2>&1 | grep -c 'initialized a new cluster\|trying to bootstrap' || true)
[ "$boots" = 1 ] || die "$old: $boots bootstraps in its log, want 1 (the first start only)"
say "graceful stop of coordinator leader $old: stopped in ${stopped} s, $new leader and a write through pgferry ${taken} s after the stop began; $old back as a member, not initialised again"
# 8b. A worker failure: worker group 2's leader killed (SIGKILL, as a host
#     crash). Patroni promotes its replica after the leader key's TTL (10 s
#     here), the coordinator's Patroni updates pg_dist_node, and a write to a
#     key of group 2, sent through pgferry right after the kill, is held and
#     then runs on the new leader. (A write pgferry must send through the
#     coordinator, like ledger's, fails in Citus until pg_dist_node changes.)
dead=$(leader_of 2)
key=$(ferry "$PGFERRY1_RW_PORT" -c "SELECT t FROM generate_series(1, 50) t
    WHERE (SELECT groupid FROM pg_dist_placement WHERE shardid = get_shard_id_for_distribution_column('events', t)) = 2 LIMIT 1")
[ -n "$key" ] || die "no tenant key on worker group 2"
t=$SECONDS
pod kill -s KILL "pgferry-check_${dead}_1"
ferry "$PGFERRY1_RW_PORT" -c "INSERT INTO events (tenant_id, v) VALUES ($key, 'after the worker crash')" >/dev/null \
    || die "a write to worker group 2 after its leader was killed"
held=$((SECONDS - t))
now=$(leader_of 2)
[ -n "$now" ] && [ "$now" != "$dead" ] || die "group 2 has no new leader ($now) after $dead was killed"
pod start "pgferry-check_${dead}_1"
say "worker failure: $dead killed; a write to group 2 through pgferry held and done after ${held} s, on the new leader $now"

t=$SECONDS
pod stop -t 40 pgferry-check_pgferry2_1
code=$(podman inspect --format '{{.State.ExitCode}}' pgferry-check_pgferry2_1)
[ "$code" = 0 ] || die "pgferry2 exited $code on SIGTERM (want a drained, clean exit)"
# The log is read into a variable, then searched: `podman logs | grep -q`
# under pipefail fails whenever grep stops reading before podman has written
# everything (SIGPIPE), which made this check fail once with the line there.
# (conmon may also write a stopped container's last lines a moment later.)
stopped_log=
for _ in $(seq 1 50); do
    stopped_log=$(podman logs pgferry-check_pgferry2_1 2>&1)
    grep -q 'SIGTERM: graceful shutdown' <<<"$stopped_log" && break
    sleep 0.2
done
grep -q 'SIGTERM: graceful shutdown' <<<"$stopped_log" \
    || die "pgferry2's log has no graceful shutdown: $(tail -5 <<<"$stopped_log" | grep -v systemd)"
say "pgferry2 drained and exited 0 in $((SECONDS - t)) s on SIGTERM"

# 9. The PostgreSQL image refuses wrong settings before starting anything.
refuse() { # WANT-IN-MESSAGE ENV...
    local want=$1 out code=0
    shift
    podman volume rm -f pgferry-check-refuse >/dev/null 2>&1 || true
    out=$(timeout 60 podman run --rm -v pgferry-check-refuse:/var/lib/postgresql/data \
        -e POSTGRES_PASSWORD=x -e REPLICATION_PASSWORD=x -e POSTGRES_DB=app "$@" \
        localhost/pgferry-postgres 2>&1 | grep -v systemd) || code=$?
    grep -q "FATAL: .*$want" <<<"$out" || die "wrong settings ($*) were not refused with '$want': $out"
    leftovers=$(podman run --rm -v pgferry-check-refuse:/d --entrypoint ls localhost/pgferry-postgres -A /d 2>/dev/null | grep -v systemd || true)
    [ -z "$leftovers" ] || die "a refused start left files behind: $leftovers"
    podman volume rm -f pgferry-check-refuse >/dev/null 2>&1 || true
}
refuse "PATRONI_ETCD3_HOSTS" -e CITUS_ENABLE=true -e PATRONI_ENABLE=true -e PATRONI_SCOPE=x -e CITUS_GROUP=0
refuse "CITUS_GROUP 1 or more" -e CITUS_ENABLE=true -e CITUS_ROLE=worker -e CITUS_GROUP=0 \
    -e PATRONI_ENABLE=true -e PATRONI_SCOPE=x -e PATRONI_ETCD3_HOSTS=127.0.0.1:$ETCD1_PORT
refuse "answered within 3s" -e CITUS_ENABLE=true -e CITUS_GROUP=0 -e PATRONI_ENABLE=true \
    -e PATRONI_SCOPE=x -e PATRONI_ETCD3_HOSTS=127.0.0.1:1 -e DCS_WAIT=3
refuse "POSTGRES_PASSWORD" -e POSTGRES_PASSWORD= -e CITUS_ENABLE=true
say "misconfigured Citus/Patroni refused with a clear error, nothing left behind"

# 10. The Swarm stack (not run here: one host): its pgferry config, with the
#     stack's defaults (no environment), passes pgferry's own check, and the
#     file parses where a docker client is at hand.
mounts=()
for f in pgferry_userlist pgferry_cert pgferry_key app_password; do
    mounts+=(-v "$HERE/secrets/$f:/run/secrets/$f:ro")
done
podman run --rm "${mounts[@]}" -v "$HERE/pgferry.toml:/etc/pgferry/pgferry.toml:ro" localhost/pgferry \
    --check-config /etc/pgferry/pgferry.toml >/dev/null 2>$LOGS/swarm-config.log \
    || { grep -v systemd $LOGS/swarm-config.log >&2; die "pgferry.toml with the Swarm stack's defaults"; }
if command -v docker >/dev/null 2>&1; then
    docker stack config -c "$ROOT/deploy/swarm/stack.yml" >/dev/null || die "deploy/swarm/stack.yml does not parse"
    say "Swarm stack: pgferry.toml valid with its defaults; stack.yml parses (docker stack config)"
else
    say "Swarm stack: pgferry.toml valid with its defaults (no docker client here to parse stack.yml)"
fi

say "all checks passed in $((SECONDS - T0)) s; taking the stack down"
