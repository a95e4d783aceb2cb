#!/usr/bin/env bash
# The project's test command: builds the binaries that the end-to-end tests
# run (target/debug/pgferry), then runs every test in the workspace.
#
#   deploy/test.sh                 all tests
#   deploy/test.sh -p pgferry-tests    extra arguments go to `cargo test`
#
# Needs PostgreSQL 15 in /usr/lib/postgresql/15/bin (`.ci/run` installs it on
# Debian 12). The exit status is cargo's: non-zero if anything failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
    echo "deploy/test.sh: PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin/initdb);" >&2
    echo "  apt-get install postgresql-15 postgresql-client-15, or run .ci/run as root" >&2
    exit 1
fi

# The end-to-end tests start PostgreSQL clusters and pgferry processes; on a
# 2-core machine more than two tests at a time only adds timing noise.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"

cargo build --bins
if [ $# -eq 0 ]; then
    set -- --workspace
fi
exec cargo test --no-fail-fast "$@"
