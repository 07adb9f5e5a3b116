#!/usr/bin/env bash
# Installs (from Debian's and PyPI's packages) and starts every service the tests need, reusing
# whatever already runs. Safe to run again: each step checks before it acts.
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }
here=$(cd "$(dirname "$0")/.." && pwd)
state_dir=${BERTH_SERVICES_DIR:-/tmp/berth-services}
mkdir -p "$state_dir"

apt_updated=0
need_packages=()
command -v rabbitmq-server >/dev/null || need_packages+=(rabbitmq-server)
command -v redis-server >/dev/null || need_packages+=(redis-server)
command -v dockerd >/dev/null || need_packages+=(docker.io)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sh && ldd /bin/busybox 2>&1 | grep -q 'not a dynamic' \
  || need_packages+=(busybox-static)
command -v docker-compose >/dev/null || need_packages+=(docker-compose)
# The workspace agent makes an ext4 image per session (workspace.filesystem = "image").
command -v mkfs.ext4 >/dev/null || need_packages+=(e2fsprogs)
# gVisor for profiles with `runtime = "runsc"`; iptables for the container agent's egress rules.
command -v runsc >/dev/null || need_packages+=(runsc)
command -v iptables >/dev/null || need_packages+=(iptables)
# The fault tests put socat proxies in front of the Docker socket and the object store to cut them.
command -v socat >/dev/null || need_packages+=(socat)
# The console's browser tests (tests/console.rs) drive Debian's headless Chromium (chromedriver
# alongside, for WebDriver clients) and Firefox ESR.
command -v chromium >/dev/null || need_packages+=(chromium)
command -v chromedriver >/dev/null || need_packages+=(chromium-driver)
command -v firefox-esr >/dev/null || need_packages+=(firefox-esr)
if [ ${#need_packages[@]} -gt 0 ]; then
  log "installing ${need_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt_updated=1
  apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >"$state_dir/apt.log" 2>&1 \
    || { cat "$state_dir/apt.log" >&2; exit 1; }
fi

wait_for() { # wait_for <what> <seconds> <command...>
  local what=$1 seconds=$2; shift 2
  for _ in $(seq 1 "$seconds"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  log "$what did not come up in ${seconds}s"; return 1
}

# RabbitMQ on 127.0.0.1:5672, guest/guest.
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  log "starting rabbitmq"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for rabbitmq 120 rabbitmq-diagnostics -q check_port_connectivity
fi
# The management API on 127.0.0.1:15672: bootstrap creates the bus identities (one user per
# component, protocol::identity) through it. Enabling a plugin needs no restart; idempotent.
if ! curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1; then
  log "enabling rabbitmq_management"
  rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null
  wait_for "rabbitmq management" 60 curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview
fi

# Redis on 6379 with the append-only file (fsync every second), as a deployment runs it: thred
# state and timers survive a Redis restart. The engine sets notify-keyspace-events itself.
if ! redis-cli -p 6379 ping >/dev/null 2>&1; then
  log "starting redis"
  mkdir -p "$state_dir/redis"
  redis-server --daemonize yes --port 6379 --dir "$state_dir/redis" --save "" \
    --appendonly yes --appendfsync everysec >/dev/null
  wait_for redis 30 redis-cli -p 6379 ping
fi

# gVisor registered with dockerd as the `runsc` runtime. Debian's build has no systrap platform;
# ptrace works on these machines. Its own network stack (netstack) refuses to start on kernels that
# show net.core.rmem_default in every network namespace (it takes that file for "root namespace"),
# so the sandbox uses the kernel's stack inside the container's own namespace (--network=host:
# the container's namespace, not the host's; the egress rules apply unchanged). Merged into an
# existing daemon.json, written only when missing or different.
register_runsc() {
  python3 - <<'PY'
import json, os
path = "/etc/docker/daemon.json"
config = {}
if os.path.exists(path):
    with open(path) as handle:
        text = handle.read().strip()
        config = json.loads(text) if text else {}
wanted = {"path": "/usr/bin/runsc", "runtimeArgs": ["--platform=ptrace", "--network=host"]}
if config.get("runtimes", {}).get("runsc") != wanted:
    config.setdefault("runtimes", {})["runsc"] = wanted
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(config, handle, indent=2)
    os.replace(path + ".tmp", path)
    print("changed")
PY
}
runsc_changed=$(register_runsc)
[ -n "$runsc_changed" ] && log "registered runsc in /etc/docker/daemon.json"

# Docker engine with its defaults (iptables on: that is what isolates session containers).
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  # A dockerd that was killed leaves pid files behind that stop the next one from starting.
  for pid_file in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
    if [ -f "$pid_file" ] && ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then rm -f "$pid_file"; fi
  done
  nohup dockerd >"$state_dir/dockerd.log" 2>&1 &
  wait_for dockerd 60 docker info || { tail -n 30 "$state_dir/dockerd.log" >&2; exit 1; }
fi

# A running dockerd reloads its runtimes on SIGHUP: no restart, running containers keep going.
if [ -n "$runsc_changed" ] || ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; then
  log "reloading dockerd for the runsc runtime"
  kill -HUP "$(cat /var/run/docker.pid)"
  wait_for "dockerd with runsc" 30 sh -c "docker info --format '{{json .Runtimes}}' | grep -q '\"runsc\"'" \
    || { tail -n 30 "$state_dir/dockerd.log" >&2; exit 1; }
fi

# Test images, FROM scratch with a static busybox: no image can be pulled here.
"$here/scripts/test-images.sh"

# Extra Docker engines for the multi-host tests (tests/hosts.rs): hosts h2 and h3 on this machine,
# each with its own socket, roots, bridge and address pool; docker0 is checked to survive.
"$here/scripts/extra-dockerd.sh"

# S3-compatible server: moto in server mode on 127.0.0.1:9000.
if ! curl -fsS -o /dev/null http://127.0.0.1:9000/moto-api/ 2>/dev/null; then
  if ! python3 -c 'import moto.server' 2>/dev/null; then
    log "installing moto[server]"
    python3 -m pip install -q 'moto[server]' >"$state_dir/pip.log" 2>&1 || { cat "$state_dir/pip.log" >&2; exit 1; }
  fi
  log "starting moto s3 server"
  nohup python3 -m moto.server -H 127.0.0.1 -p 9000 >"$state_dir/moto.log" 2>&1 &
  echo $! >"$state_dir/moto.pid"
  wait_for moto 60 curl -fsS -o /dev/null http://127.0.0.1:9000/moto-api/
fi
log "all services up"
