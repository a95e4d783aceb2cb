# Source this: podman and buildah settings that work on a host where only
# loopback traffic is allowed and root lacks CAP_SYS_RESOURCE (the CI and
# development machines). Nothing of the host's own podman configuration is
# changed: everything goes through CONTAINERS_CONF.
#
# - runc: crun cannot set RLIMIT_NOFILE here and fails on hybrid cgroups;
# - default_ulimits at the hard limit (podman's default asks for more);
# - host networking only, and a CNI config dir with no plugins, so that no
#   bridge, NAT rule or ip_forward change can be made even by mistake.
# Root's own directory (not /tmp or /var/tmp, where another user could plant
# a containers.conf naming another runtime).
PGFERRY_PODMAN_DIR=${PGFERRY_PODMAN_DIR:-/var/lib/pgferry-podman}
mkdir -p "$PGFERRY_PODMAN_DIR/no-cni"
chmod 0700 "$PGFERRY_PODMAN_DIR"
pgferry_nofile=$(ulimit -Hn)
[ "$pgferry_nofile" = unlimited ] && pgferry_nofile=1048576
cat >"$PGFERRY_PODMAN_DIR/containers.conf" <<CONF
[containers]
netns = "host"
default_ulimits = ["nofile=$pgferry_nofile:$pgferry_nofile", "nproc=32768:32768"]
[engine]
runtime = "runc"
[network]
network_backend = "cni"
cni_plugin_dirs = ["$PGFERRY_PODMAN_DIR/no-cni"]
network_config_dir = "$PGFERRY_PODMAN_DIR/no-cni"
CONF
export CONTAINERS_CONF="$PGFERRY_PODMAN_DIR/containers.conf"
unset pgferry_nofile
