# Sourced by the scripts in this folder (after services.sh): a RabbitMQ 4.x broker next to the
# machine's own, from Debian trixie's rabbitmq-server in a chroot, on its own ports and its own epmd.
#
#   ensure_rabbitmq4           one node, rabbit4@localhost, AMQP on 127.0.0.1:5673; prints its URL
#   ensure_rabbitmq4_cluster   three nodes, rabbit4a/b/c@localhost on 5674/5675/5676, clustered;
#                              prints the comma-separated URLs
#   stop_rabbitmq4, stop_rabbitmq4_cluster
#   rabbitmq4_ctl NODE ARGS... rabbitmqctl inside the chroot, e.g. rabbitmq4_ctl rabbit4a@localhost stop_app
#
# The chroot is built once (debootstrap from the Debian mirror the machine's apt sources name, as
# root) and kept under ONCELY_RABBITMQ4_ROOT, a fixed machine path, so every run and CI job on this
# machine re-uses it. Everything here is idempotent. Processes are only ever signalled after
# checking that their /proc/PID/root is the chroot: the machine's own broker is never touched.
# shellcheck shell=bash

: "${ONCELY_RABBITMQ4_ROOT:=/var/lib/oncely/rabbitmq4-trixie}"
export ONCELY_RABBITMQ4_ROOT
# The broker's user inside the chroot. Debian would give it uid 101, the host's postgres here:
# a fixed uid no host account uses keeps `ps` and the host's tools from confusing the two.
ONCELY_RABBITMQ4_UID=2201
ONCELY_RABBITMQ4_EPMD_PORT=4370

if ! declare -F say >/dev/null; then say() { printf 'oncely: %s\n' "$*" >&2; }; fi
if ! declare -F port_open >/dev/null; then
  port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
fi

# The Debian mirror the machine's own apt sources use (deb822 or one-line format).
rabbitmq4_mirror() {
  local uri
  uri=$(grep -rhoE '(URIs:[[:space:]]*|^deb[[:space:]]+)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -n 1)
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

rabbitmq4_mounts() {
  local root=$ONCELY_RABBITMQ4_ROOT
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
  mountpoint -q "$root/dev/pts" || mount --bind /dev/pts "$root/dev/pts"
}

build_rabbitmq4_chroot() {
  local root=$ONCELY_RABBITMQ4_ROOT
  if [ -e "$root/.oncely-ready" ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    say "RabbitMQ 4 needs a chroot built as root once ($root); run ./scripts/test as root"
    return 1
  fi
  local mirror started=$SECONDS
  mirror=$(rabbitmq4_mirror)
  command -v debootstrap >/dev/null || apt_install debootstrap
  say "building the RabbitMQ 4 chroot in $root from $mirror (once per machine, a few minutes)"
  # A half-built chroot from an interrupted run is rebuilt from scratch.
  if [ -d "$root" ]; then rabbitmq4_umount; rm -rf --one-file-system "$root"; fi
  mkdir -p "$root"
  debootstrap --variant=minbase trixie "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
    say "debootstrap failed, see $root.debootstrap.log"; return 1; }
  # Package scripts must not start a node: it would meet the host's epmd.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod +x "$root/usr/sbin/policy-rc.d"
  cp /etc/hosts /etc/resolv.conf "$root/etc/"
  local security=${mirror%/debian*}/debian-security
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror trixie main
deb $mirror trixie-updates main
deb $security trixie-security main
EOF
  rabbitmq4_mounts
  chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends rabbitmq-server' \
    >"$root.install.log" 2>&1 || { say "installing rabbitmq-server failed, see $root.install.log"; return 1; }
  chroot "$root" groupmod -g "$ONCELY_RABBITMQ4_UID" rabbitmq
  chroot "$root" usermod -u "$ONCELY_RABBITMQ4_UID" -g "$ONCELY_RABBITMQ4_UID" rabbitmq
  chroot "$root" chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq
  # Each node gets its name, ports and directories from the environment (rabbitmq4_node_env);
  # this file only keeps every tool in the chroot on the chroot's own epmd.
  printf 'export ERL_EPMD_PORT=%s\n' "$ONCELY_RABBITMQ4_EPMD_PORT" >"$root/etc/rabbitmq/rabbitmq-env.conf"
  printf '[].\n' >"$root/etc/rabbitmq/enabled_plugins"
  touch "$root/.oncely-ready"
  say "RabbitMQ 4 chroot built in $(( SECONDS - started )) s"
}

rabbitmq4_umount() {
  local root=$ONCELY_RABBITMQ4_ROOT m
  for m in dev/pts dev proc; do
    if mountpoint -q "$root/$m"; then umount "$root/$m" || umount -l "$root/$m"; fi
  done
}

# NODE (short name before @localhost), AMQP port: the node's environment inside the chroot.
rabbitmq4_node_env() {
  local name=$1 port=$2
  printf '%s\n' PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq LANG=C.UTF-8 \
    ERL_EPMD_PORT=$ONCELY_RABBITMQ4_EPMD_PORT \
    RABBITMQ_NODENAME="$name@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT=$(( port + 20000 )) \
    RABBITMQ_CONFIG_FILE="/etc/rabbitmq/$name.conf" \
    RABBITMQ_MNESIA_BASE=/var/lib/rabbitmq/mnesia RABBITMQ_LOG_BASE=/var/log/rabbitmq \
    RABBITMQ_PID_FILE="/var/lib/rabbitmq/mnesia/$name@localhost.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins
}

# rabbitmqctl inside the chroot. NODE is the full node name (rabbit4@localhost).
rabbitmq4_ctl() {
  local node=$1; shift
  chroot "$ONCELY_RABBITMQ4_ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq \
    LANG=C.UTF-8 ERL_EPMD_PORT=$ONCELY_RABBITMQ4_EPMD_PORT rabbitmqctl -q -n "$node" "$@"
}

rabbitmq4_ping() {
  chroot "$ONCELY_RABBITMQ4_ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq \
    LANG=C.UTF-8 ERL_EPMD_PORT=$ONCELY_RABBITMQ4_EPMD_PORT \
    rabbitmq-diagnostics -q -n "$1" ping >/dev/null 2>&1
}

# Starts NAME on PORT unless it already answers; does not wait.
rabbitmq4_start_node() {
  local name=$1 port=$2 root=$ONCELY_RABBITMQ4_ROOT
  if rabbitmq4_ping "$name@localhost"; then return 0; fi
  if port_open "$port"; then
    say "port $port is taken by something other than $name@localhost"; return 1
  fi
  cat >"$root/etc/rabbitmq/$name.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$port
loopback_users = none
EOF
  local env
  mapfile -t env < <(rabbitmq4_node_env "$name" "$port")
  say "starting RabbitMQ 4 node $name@localhost on 127.0.0.1:$port"
  setsid chroot "$root" env -i "${env[@]}" runuser -u rabbitmq -- /usr/lib/rabbitmq/bin/rabbitmq-server \
    >>"$root/var/log/rabbitmq/$name.stdout" 2>&1 </dev/null &
  disown
}

rabbitmq4_wait_node() {
  local node=$1 deadline=$(( SECONDS + 120 ))
  until rabbitmq4_ping "$node"; do
    if (( SECONDS > deadline )); then say "$node did not come up in time"; return 1; fi
    sleep 0.5
  done
  rabbitmq4_ctl "$node" await_startup >/dev/null
}

rabbitmq4_prepare() {
  build_rabbitmq4_chroot || return 1
  rabbitmq4_mounts
}

ensure_rabbitmq4() {
  rabbitmq4_prepare || return 1
  local started=$SECONDS
  if ! rabbitmq4_ping rabbit4@localhost; then
    rabbitmq4_start_node rabbit4 5673 || return 1
    rabbitmq4_wait_node rabbit4@localhost || return 1
    say "RabbitMQ 4 node up in $(( SECONDS - started )) s"
  fi
  if ! rabbitmq4_ctl rabbit4@localhost list_queues name >/dev/null 2>&1; then
    say "the RabbitMQ 4 node is not healthy: starting it afresh"
    rabbitmq4_wipe_nodes rabbit4
    rabbitmq4_start_node rabbit4 5673 && rabbitmq4_wait_node rabbit4@localhost || return 1
  fi
  echo "amqp://guest:guest@127.0.0.1:5673/%2f"
}

ONCELY_RABBITMQ4_CLUSTER=(rabbit4a:5674 rabbit4b:5675 rabbit4c:5676)

# The cluster's AMQP URLs, comma-separated.
rabbitmq4_cluster_urls() {
  local entry urls=()
  for entry in "${ONCELY_RABBITMQ4_CLUSTER[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:${entry##*:}/%2f"); done
  local IFS=,
  echo "${urls[*]}"
}

# Whether the first node reports all three nodes running, in one rabbitmqctl call.
rabbitmq4_cluster_running() {
  local status entry
  status=$(rabbitmq4_ctl rabbit4a@localhost cluster_status --formatter json 2>/dev/null) || return 1
  status=${status#*\"running_nodes\":[}
  status=${status%%]*}
  for entry in "${ONCELY_RABBITMQ4_CLUSTER[@]}"; do
    [[ $status == *"\"${entry%%:*}@localhost\""* ]] || return 1
  done
}

# Whether every node of the cluster runs and answers for its queues (a node whose data was hurt,
# by a full disk say, runs without its tables).
rabbitmq4_cluster_healthy() {
  rabbitmq4_cluster_running || return 1
  local entry
  for entry in "${ONCELY_RABBITMQ4_CLUSTER[@]}"; do
    rabbitmq4_ctl "${entry%%:*}@localhost" list_queues name >/dev/null 2>&1 || return 1
  done
}

# Stops the named nodes and deletes their data: they hold test queues only.
rabbitmq4_wipe_nodes() {
  local name
  for name in "$@"; do
    rabbitmq4_stop_node "$name@localhost"
    rm -rf --one-file-system "$ONCELY_RABBITMQ4_ROOT/var/lib/rabbitmq/mnesia/$name@localhost" \
      "$ONCELY_RABBITMQ4_ROOT/var/lib/rabbitmq/mnesia/$name@localhost-"*
  done
}

ensure_rabbitmq4_cluster() {
  rabbitmq4_prepare || return 1
  if rabbitmq4_cluster_healthy; then rabbitmq4_cluster_urls; return 0; fi
  if rabbitmq4_start_cluster && rabbitmq4_cluster_healthy; then rabbitmq4_cluster_urls; return 0; fi
  say "the RabbitMQ 4 cluster is not healthy: starting it afresh"
  rabbitmq4_wipe_nodes "${ONCELY_RABBITMQ4_CLUSTER[@]%%:*}"
  rabbitmq4_start_cluster && rabbitmq4_cluster_healthy || { say "the RabbitMQ 4 cluster did not come up"; return 1; }
  rabbitmq4_cluster_urls
}

rabbitmq4_start_cluster() {
  local started=$SECONDS entry name first=rabbit4a@localhost
  # Started together: a node of a cluster that stopped as a whole waits for its peers at boot.
  for entry in "${ONCELY_RABBITMQ4_CLUSTER[@]}"; do
    rabbitmq4_start_node "${entry%%:*}" "${entry##*:}" || return 1
  done
  for entry in "${ONCELY_RABBITMQ4_CLUSTER[@]}"; do
    name=${entry%%:*}
    rabbitmq4_wait_node "$name@localhost" || return 1
    # A node left stopped by an interrupted test (stop_app) is brought back.
    rabbitmq4_ctl "$name@localhost" start_app >/dev/null 2>&1 || true
  done
  for entry in "${ONCELY_RABBITMQ4_CLUSTER[@]:1}"; do
    name=${entry%%:*}
    if ! rabbitmq4_ctl "$first" cluster_status --formatter json | grep -q "\"$name@localhost\""; then
      say "joining $name@localhost to $first"
      rabbitmq4_ctl "$name@localhost" stop_app >/dev/null
      rabbitmq4_ctl "$name@localhost" reset >/dev/null
      rabbitmq4_ctl "$name@localhost" join_cluster "$first" >/dev/null
      rabbitmq4_ctl "$name@localhost" start_app >/dev/null
    fi
  done
  say "RabbitMQ 4 cluster up in $(( SECONDS - started )) s"
}

# Signals only processes whose root directory is the chroot.
rabbitmq4_kill_chroot_processes() {
  local root pid
  root=$(readlink -f "$ONCELY_RABBITMQ4_ROOT")
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    if [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ]; then
      kill "$pid" 2>/dev/null || true
    fi
  done
}

rabbitmq4_stop_node() {
  if rabbitmq4_ping "$1"; then rabbitmq4_ctl "$1" stop >/dev/null 2>&1 || true; fi
}

# Stops the chroot's epmd (and anything else left in the chroot) once no node is running in it.
rabbitmq4_stop_epmd_if_idle() {
  local entry
  for entry in rabbit4 "${ONCELY_RABBITMQ4_CLUSTER[@]%%:*}"; do
    if rabbitmq4_ping "$entry@localhost"; then return 0; fi
  done
  chroot "$ONCELY_RABBITMQ4_ROOT" env -i PATH=/usr/bin:/bin epmd -port "$ONCELY_RABBITMQ4_EPMD_PORT" -kill \
    >/dev/null 2>&1 || true
  rabbitmq4_kill_chroot_processes
}

stop_rabbitmq4() {
  [ -e "$ONCELY_RABBITMQ4_ROOT/.oncely-ready" ] || return 0
  rabbitmq4_stop_node rabbit4@localhost
  rabbitmq4_stop_epmd_if_idle
}

stop_rabbitmq4_cluster() {
  [ -e "$ONCELY_RABBITMQ4_ROOT/.oncely-ready" ] || return 0
  local entry
  for entry in "${ONCELY_RABBITMQ4_CLUSTER[@]}"; do rabbitmq4_stop_node "${entry%%:*}@localhost"; done
  rabbitmq4_stop_epmd_if_idle
}
