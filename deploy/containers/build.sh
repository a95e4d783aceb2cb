#!/usr/bin/env bash
# Builds pgferry's OCI images with podman, from a Debian 12 base made by
# debootstrap (no image registry is needed: only a Debian mirror).
#
#   deploy/containers/build.sh [base|pgferry|postgres|etcd|prometheus|all]...
#
# Images (all tagged localhost/...:latest):
#   debian:bookworm     minbase Debian 12 with bookworm-security, for the rest
#   pgferry             the proxy (built outside: PGFERRY_BIN or target/release)
#   pgferry-postgres    PostgreSQL 15 + Citus 13 + Patroni, one entrypoint
#   pgferry-etcd        etcd 3.4 (Debian's)
#   pgferry-prometheus  Prometheus (Debian's) with pgferry's alert rules
#
# Env: PGFERRY_BIN (default target/release/pgferry, built if missing),
# DEBIAN_MIRROR (default: the first deb.debian.org-style URI in apt sources),
# CITUS_TARBALL (default ../shared/citus/citus-*.tar.xz when present).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$HERE/podman-env.sh"

say() { echo "== build.sh: $*" >&2; }
die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (rootful podman is what works on this kind of host)"
command -v podman >/dev/null || die "podman is missing: apt-get install podman buildah runc debootstrap"

mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v security | grep -oE 'https?://[^ ]+/debian/?' | head -n1)
    echo "${uri:-http://deb.debian.org/debian}"
}

image_exists() { podman image exists "$1"; }

build_base() {
    if image_exists localhost/debian:bookworm && [ -z "${REBUILD_BASE:-}" ]; then
        say "localhost/debian:bookworm exists (REBUILD_BASE=1 to make it again)"
        return
    fi
    local m rootfs
    m=$(mirror)
    rootfs=$(mktemp -d /var/tmp/pgferry-rootfs.XXXXXX)
    say "debootstrap --variant=minbase bookworm from $m"
    debootstrap --variant=minbase bookworm "$rootfs" "$m" >$PGFERRY_PODMAN_DIR/debootstrap.log 2>&1 \
        || { tail -n 20 $PGFERRY_PODMAN_DIR/debootstrap.log >&2; die "debootstrap failed"; }
    # The host's PostgreSQL comes from bookworm-security (15.20 vs 15.18):
    # the images must match it (Citus here is built against 15.20).
    local sec=${m%/debian*}/debian-security
    cat >"$rootfs/etc/apt/sources.list" <<SRC
deb $m bookworm main
deb $m bookworm-updates main
deb $sec bookworm-security main
SRC
    # Small and quiet apt in every image built on this base.
    cat >"$rootfs/etc/apt/apt.conf.d/90pgferry" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
APT
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | podman import - localhost/debian:bookworm >/dev/null
    rm -rf "$rootfs"
    say "localhost/debian:bookworm: $(podman image inspect --format '{{.Size}}' localhost/debian:bookworm | numfmt --to=iec)"
}

build() { # NAME CONTEXT [build args...]
    local name=$1 ctx=$2
    shift 2
    say "building localhost/$name"
    # --format docker: OCI image configs cannot carry HEALTHCHECK.
    podman build --network=host --format docker -t "localhost/$name:latest" "$@" "$ctx"
    say "localhost/$name: $(podman image inspect --format '{{.Size}}' "localhost/$name:latest" | numfmt --to=iec)"
}

build_pgferry() {
    local bin=${PGFERRY_BIN:-$ROOT/target/release/pgferry}
    if [ ! -x "$bin" ]; then
        say "building pgferry (cargo build --release -p pgferry-proxy)"
        (cd "$ROOT" && cargo build --release -p pgferry-proxy)
        bin=$ROOT/target/release/pgferry
    fi
    local ctx
    ctx=$(mktemp -d /var/tmp/pgferry-ctx.XXXXXX)
    cp "$HERE/pgferry/Containerfile" "$ctx/"
    install -m 0755 "$bin" "$ctx/pgferry"
    strip "$ctx/pgferry" 2>/dev/null || true
    build pgferry "$ctx"
    rm -rf "$ctx"
}

build_postgres() {
    local ctx tarball=${CITUS_TARBALL:-}
    if [ -z "$tarball" ]; then
        tarball=$(ls "$ROOT"/../shared/citus/citus-*-pg15-debian12-amd64.tar.xz 2>/dev/null | head -n1 || true)
    fi
    ctx=$(mktemp -d /var/tmp/pgferry-ctx.XXXXXX)
    cp "$HERE/postgres/Containerfile" "$HERE/postgres/entrypoint.sh" "$ctx/"
    if [ -n "$tarball" ] && [ -f "$tarball" ]; then
        cp "$tarball" "$ctx/citus.tar.xz"
    else
        say "no Citus build found (CITUS_TARBALL): the image will have PostgreSQL and Patroni only"
        : >"$ctx/citus.tar.xz"
    fi
    build pgferry-postgres "$ctx"
    rm -rf "$ctx"
}

build_etcd() { build pgferry-etcd "$HERE/etcd"; }

build_prometheus() {
    local ctx
    ctx=$(mktemp -d /var/tmp/pgferry-ctx.XXXXXX)
    cp "$HERE/prometheus/Containerfile" "$ctx/"
    cp "$HERE/prometheus/entrypoint.sh" "$ROOT/deploy/prometheus/pgferry-alerts.yml" "$ctx/"
    build pgferry-prometheus "$ctx"
    rm -rf "$ctx"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(all)
for t in "${targets[@]}"; do
    case "$t" in
        base) build_base ;;
        pgferry) build_base; build_pgferry ;;
        postgres) build_base; build_postgres ;;
        etcd) build_base; build_etcd ;;
        prometheus) build_base; build_prometheus ;;
        all) build_base; build_etcd; build_postgres; build_pgferry; build_prometheus ;;
        *) die "unknown image '$t' (base, pgferry, postgres, etcd, prometheus, all)" ;;
    esac
done
