#!/usr/bin/env bash
# Makes the secrets the compose stack mounts (deploy/compose/secrets/), once:
# random passwords, pgferry's users file and a self-signed certificate for
# pgferry's client TLS. Existing files are kept. For production, put your own
# in their place (the Swarm stack takes them as `docker secret`s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
umask 077
mkdir -p secrets
chmod 0700 secrets
pw() { [ -s "secrets/$1" ] || head -c 18 /dev/urandom | base64 | tr -d '/+=' >"secrets/$1"; }
pw postgres_password
pw replication_password
pw app_password
pw admin_password
# pgferry's users file: the app role with its plaintext password (pgferry
# derives the SCRAM secret; server logins use the same password).
# The admin entry is pgferry's own (the console), not a PostgreSQL role.
printf '"app" "%s"\n"admin" "%s"\n' "$(cat secrets/app_password)" "$(cat secrets/admin_password)" >secrets/pgferry_userlist
if [ ! -s secrets/pgferry_cert ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
        -subj "/CN=pgferry" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout secrets/pgferry_key -out secrets/pgferry_cert 2>/dev/null
fi
# Containers read them as other users (postgres, pgferry): the directory
# stays private to root, the files are readable inside the mounts.
chmod 0644 secrets/*
echo "secrets in $(pwd)/secrets"
