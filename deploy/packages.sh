# The Debian 12 packages pgferry needs: the one list that deploy/quickstart.sh
# and .ci/run both read, so the two cannot drift apart. Source it.
#
# Why libprotobuf-dev is named: etcd-client's build script runs protoc on
# Google's well-known types (google/protobuf/descriptor.proto), which live in
# libprotobuf-dev. protobuf-compiler only recommends it, so an install with
# --no-install-recommends (the quickstart's) left it out and the build failed.
# libclang-dev: pg_query (libpg_query, the parser behind Citus routing)
# generates its bindings with bindgen, which loads libclang at build time.

# To build and run pgferry with a local PostgreSQL pair (the quickstart).
PGFERRY_BUILD_PKGS=(postgresql-15 postgresql-client-15 build-essential pkg-config
    protobuf-compiler libprotobuf-dev libclang-dev openssl ca-certificates curl)

# The quickstart's default (and --citus) mode: etcd and Patroni. patroni
# depends on python3-etcd, which its etcd3 support imports.
PGFERRY_PATRONI_PKGS=(etcd-server etcd-client patroni)

# What the test suite adds: etcd and Patroni for failover, PgBouncer for the
# side-by-side checks, promtool (prometheus), chromium for the status page
# screenshot, the JDK and pgjdbc for the JDBC batch test, pip for the Python
# drivers.
PGFERRY_TEST_PKGS=(pgbouncer etcd-server etcd-client patroni haproxy python3-pip
    prometheus chromium default-jdk-headless libpostgresql-jdbc-java)

# missing_pkgs NAME... -> prints the ones dpkg does not list as installed
missing_pkgs() {
    local pkg
    for pkg in "$@"; do
        # (dpkg-query, not dpkg -s | grep -q: under pipefail, grep's early
        # exit can fail the pipe and call an installed package missing)
        [ "$(dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || echo "$pkg"
    done
}
