#!/usr/bin/env bash
# Extra Docker engines on this machine, one per extra host of the multi-host tests (tests/hosts.rs):
# host hN listens on /run/berth-docker/hN.sock with its own data root, exec root (its own
# containerd), pid file, a bridge of its own created here beforehand (`--bridge berth-hN`; never
# `--bridge=none`, whose start and stop removed the first daemon's docker0) and its own address
# pool, so no two engines hand out the same subnet. iptables stays on: port publishing and the
# container agent's egress rules (DOCKER-USER) need it. Idempotent; checks that docker0 survives.
# BERTH_EXTRA_DOCKERDS: how many (default 2: h2 and h3; 0 starts none).
set -euo pipefail

log() { printf 'extra-dockerd: %s\n' "$*" >&2; }
count=${BERTH_EXTRA_DOCKERDS:-2}
data_root=/var/lib/berth-docker
run_root=/run/berth-docker
log_dir=${BERTH_SERVICES_DIR:-/tmp/berth-services}
mkdir -p "$data_root" "$run_root" "$log_dir"
had_docker0=0
ip link show docker0 >/dev/null 2>&1 && had_docker0=1

for index in $(seq 2 $((count + 1))); do
  [ "$count" -gt 0 ] || break
  name=h$index
  socket=$run_root/$name.sock
  bridge=berth-$name
  address=10.$((200 + index)).0.1/24
  pool=10.$((210 + index)).0.0/16
  if docker -H "unix://$socket" info >/dev/null 2>&1; then
    continue
  fi
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
  fi
  ip addr show dev "$bridge" | grep -q "inet ${address%/*}/" || ip addr add "$address" dev "$bridge"
  ip link set "$bridge" up
  # A daemon that was killed leaves its pid files behind, which stop the next one from starting.
  for pid_file in "$run_root/$name.pid" "$run_root/$name/containerd/containerd.pid"; do
    if [ -f "$pid_file" ] && ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then rm -f "$pid_file"; fi
  done
  log "starting dockerd $name on $socket (bridge $bridge $address, pool $pool)"
  nohup dockerd --host "unix://$socket" --data-root "$data_root/$name" --exec-root "$run_root/$name" \
    --pidfile "$run_root/$name.pid" --bridge "$bridge" --default-address-pool "base=$pool,size=24" \
    >"$log_dir/dockerd-$name.log" 2>&1 &
  for _ in $(seq 1 60); do
    docker -H "unix://$socket" info >/dev/null 2>&1 && break
    sleep 1
  done
  docker -H "unix://$socket" info >/dev/null 2>&1 || { tail -n 30 "$log_dir/dockerd-$name.log" >&2; exit 1; }
done

# The test images, copied from the first engine (nothing can be pulled here).
for index in $(seq 2 $((count + 1))); do
  [ "$count" -gt 0 ] || break
  socket=$run_root/h$index.sock
  for image in berth-test/busybox:latest berth-test/unhealthy:latest berth-test/oom:latest; do
    if ! docker -H "unix://$socket" image inspect "$image" >/dev/null 2>&1; then
      docker save "$image" | docker -H "unix://$socket" load -q >/dev/null
    fi
  done
done

# Starting a second engine has been seen to take docker0 with it even with a bridge of its own (on a
# machine whose extra engines had run before). The first engine does not make it again until it
# restarts, and every container on its default network fails: put it back as that engine had it.
if [ "$had_docker0" = 1 ] && ! ip link show docker0 >/dev/null 2>&1; then
  subnet=$(docker network inspect bridge --format '{{(index .IPAM.Config 0).Subnet}}')
  gateway=$(docker network inspect bridge --format '{{(index .IPAM.Config 0).Gateway}}')
  log "docker0 went away while the extra engines started; restoring it ($gateway/${subnet#*/})"
  ip link add docker0 type bridge
  ip addr add "$gateway/${subnet#*/}" dev docker0
  ip link set docker0 up
fi
if [ "$had_docker0" = 1 ] && ! ip link show docker0 >/dev/null 2>&1; then
  log "docker0 is gone after starting the extra engines"
  exit 1
fi
