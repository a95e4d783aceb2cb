#!/bin/bash
# Writes prometheus.yml, then runs Prometheus. pgferry's /metrics endpoints:
#   PGFERRY_TARGETS  host:port,... (static: compose, VMs)
#   PGFERRY_DNS_SD   name:port whose DNS A records are the pgferrys
#                    (Swarm: tasks.pgferry:8404); takes precedence
set -euo pipefail
if [ -n "${PGFERRY_DNS_SD:-}" ]; then
    [[ $PGFERRY_DNS_SD =~ ^[^:]+:[0-9]+$ ]] || { echo "PGFERRY_DNS_SD='$PGFERRY_DNS_SD': want name:port (tasks.pgferry:8404)" >&2; exit 1; }
    sd="    dns_sd_configs:
      - names: ['${PGFERRY_DNS_SD%:*}']
        type: A
        port: ${PGFERRY_DNS_SD##*:}
        refresh_interval: 15s"
else
    targets=""
    IFS=, read -r -a list <<<"$PGFERRY_TARGETS"
    for t in "${list[@]}"; do targets+="'$t', "; done
    sd="    static_configs:
      - targets: [${targets%, }]"
fi
cat >/etc/prometheus/prometheus.yml <<YML
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files: [/etc/prometheus/rules/*.yml]
scrape_configs:
  - job_name: pgferry
$sd
YML
/usr/bin/promtool check config /etc/prometheus/prometheus.yml >&2
exec /usr/bin/prometheus --config.file=/etc/prometheus/prometheus.yml \
    --storage.tsdb.path=/var/lib/prometheus --storage.tsdb.retention.time=7d \
    --web.listen-address=0.0.0.0:"$PROMETHEUS_PORT" "$@"
