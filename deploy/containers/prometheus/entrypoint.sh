#!/bin/bash
# Writes prometheus.yml for PGFERRY_TARGETS, then runs Prometheus.
set -euo pipefail
targets=""
IFS=, read -r -a list <<<"$PGFERRY_TARGETS"
for t in "${list[@]}"; do targets+="'$t', "; done
cat >/etc/prometheus/prometheus.yml <<YML
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files: [/etc/prometheus/rules/*.yml]
scrape_configs:
  - job_name: pgferry
    static_configs:
      - targets: [${targets%, }]
YML
exec /usr/bin/prometheus --config.file=/etc/prometheus/prometheus.yml \
    --storage.tsdb.path=/var/lib/prometheus --storage.tsdb.retention.time=7d \
    --web.listen-address=0.0.0.0:"$PROMETHEUS_PORT" "$@"
