#!/usr/bin/env bash
# Builds the local images compose/docker-compose.local.yml runs the stack with, on a machine that
# cannot pull from any registry but reaches Debian's package mirror (the one apt uses):
#
#   berth-local/debian:bookworm               debootstrap --variant=minbase, then `docker import`
#   berth-local/redis:bookworm                Debian's redis-server, run as the official image runs it
#   berth-local/rabbitmq:bookworm-management  Debian's rabbitmq-server with the management plugin
#   berth-local/berth:compose                 compose/Dockerfile's runtime stage on the image above,
#                                             with the `berth` binary built on the host (--binary)
#   drape/workstation-python:latest           only when missing: a busybox stand-in for the ide
#                                             profile's workspace image (label berth.stand-in=true)
#
# The first three are built only when missing or when their recipe below changed (a label carries
# its hash; --rebuild forces them). The Berth image is rebuilt on every call: Docker's layer cache
# makes that a copy of the binary. Installs debootstrap when it is missing. Prints one line per image
# with the seconds it took, or `cached`. Exit status 3: Debian's mirror cannot be reached.
#
#   scripts/compose-images.sh --binary target/debug/berth [--rebuild]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log() { printf 'compose-images: %s\n' "$*" >&2; }

binary=""
rebuild=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --rebuild) rebuild=1; shift ;;
    *) log "unknown argument $1"; exit 2 ;;
  esac
done

release=bookworm
base_image=berth-local/debian:$release
redis_image=berth-local/redis:$release
rabbitmq_image=berth-local/rabbitmq:$release-management
berth_image=${BERTH_LOCAL_IMAGE:-berth-local/berth:compose}

# Debian's mirrors as apt on this machine uses them (so a machine with a local mirror uses it).
apt_uri() { # apt_uri <suite> <fallback>
  local uri
  uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null \
    | awk -v suite="$1" '$2 == suite { print $1; exit }')
  printf '%s\n' "${uri:-$2}"
}
mirror=${BERTH_DEBIAN_MIRROR:-$(apt_uri "$release" http://deb.debian.org/debian/)}
security_mirror=${BERTH_DEBIAN_SECURITY_MIRROR:-$(apt_uri "$release-security" http://deb.debian.org/debian-security/)}

# recipe_matches <image> <hash>: the image exists and was built from this recipe.
recipe_matches() {
  [ "$rebuild" -eq 0 ] || return 1
  [ "$(docker image inspect -f '{{index .Config.Labels "berth.recipe"}}' "$1" 2>/dev/null)" = "$2" ]
}

workdir=$(mktemp -d /var/tmp/berth-compose-images.XXXXXX)
cleanup() { rm -rf "$workdir"; }
trap cleanup EXIT

# ---- the Debian base: debootstrap + docker import ------------------------------------------
base_recipe=$(printf '%s\n' "minbase $release v1 $mirror $security_mirror" | sha256sum | cut -c1-16)
# Exit status 3: the mirror cannot be reached, so nothing can be built here (the test skips).
unreachable_mirror() {
  if ! curl -fsS -o /dev/null --max-time 20 "${mirror%/}/dists/$release/Release" 2>/dev/null; then
    log "Debian's mirror $mirror cannot be reached: no local image can be built here"
    exit 3
  fi
}
build_base() {
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap; } >"$workdir/apt.log" 2>&1; then
      unreachable_mirror
      cat "$workdir/apt.log" >&2
      return 1
    fi
  fi
  local root=$workdir/rootfs
  if ! debootstrap --variant=minbase "$release" "$root" "$mirror" >"$workdir/debootstrap.log" 2>&1; then
    unreachable_mirror
    tail -n 20 "$workdir/debootstrap.log" >&2
    return 1
  fi
  # What the official image has: every suite of the release, no daemons started by package
  # scripts during image builds, no package caches.
  cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror $release main
deb $mirror $release-updates main
deb $security_mirror $release-security main
SOURCES
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod 0755 "$root/usr/sbin/policy-rc.d"
  printf 'APT::Install-Recommends "false";\n' >"$root/etc/apt/apt.conf.d/90berth-no-recommends"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
  tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL berth.recipe=$base_recipe" \
    --change 'CMD ["bash"]' \
    - "$base_image" >/dev/null
}

# ---- Redis and RabbitMQ from Debian's packages ----------------------------------------------
# As the official images behave for this stack: redis-server as user redis in /data with protected
# mode off (the official image compiles it off; the server is reachable on its Docker network
# only); RabbitMQ as user rabbitmq with its data in /var/lib/rabbitmq, logs on stdout, the
# management plugin on 15672, and guest allowed from other hosts (the official image's default).
redis_dockerfile=$(cat <<DOCKER
FROM $base_image
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* \\
    && install -d -o redis -g redis -m 0750 /data \\
    && printf '#!/bin/sh\n[ "\$1" = redis-server ] && set -- "\$@" --protected-mode no\nexec "\$@"\n' >/usr/local/bin/docker-entrypoint.sh \\
    && chmod 0755 /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
DOCKER
)
rabbitmq_dockerfile=$(cat <<DOCKER
FROM $base_image
RUN apt-get update && apt-get install -y --no-install-recommends rabbitmq-server \\
    && rm -rf /var/lib/apt/lists/* \\
    && rabbitmq-plugins enable --offline rabbitmq_management \\
    && printf 'loopback_users.guest = false\nlisteners.tcp.default = 5672\nmanagement.tcp.port = 15672\nlog.console = true\nlog.console.level = info\nlog.file = false\n' >/etc/rabbitmq/rabbitmq.conf \\
    && rm -f /var/lib/rabbitmq/.erlang.cookie
# The real scripts, not Debian's wrapper (which sends the server's output to a log file).
ENV PATH=/usr/lib/rabbitmq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    HOME=/var/lib/rabbitmq
WORKDIR /var/lib/rabbitmq
USER rabbitmq
EXPOSE 4369 5672 15672 25672
CMD ["rabbitmq-server"]
DOCKER
)

build_from_dockerfile() { # build_from_dockerfile <image> <recipe hash> <dockerfile text>
  mkdir -p "$workdir/$2"
  printf '%s\n' "$3" >"$workdir/$2/Dockerfile"
  docker build -q --label "berth.recipe=$2" -t "$1" "$workdir/$2" >"$workdir/build.log" 2>&1 \
    || { tail -n 30 "$workdir/build.log" >&2; return 1; }
}

ensure() { # ensure <image> <recipe hash> <builder...>
  local image=$1 recipe=$2; shift 2
  if recipe_matches "$image" "$recipe"; then
    log "$image: cached"
  else
    log "$image: building"
    local started=$SECONDS
    "$@"
    log "$image: built in $((SECONDS - started)) s"
  fi
}

ensure "$base_image" "$base_recipe" build_base
# A rebuilt base invalidates what is built on it: its id is part of their recipes.
base_id=$(docker image inspect -f '{{.Id}}' "$base_image")
redis_recipe=$(printf '%s\n%s\n' "$base_id" "$redis_dockerfile" | sha256sum | cut -c1-16)
rabbitmq_recipe=$(printf '%s\n%s\n' "$base_id" "$rabbitmq_dockerfile" | sha256sum | cut -c1-16)
ensure "$redis_image" "$redis_recipe" build_from_dockerfile "$redis_image" "$redis_recipe" "$redis_dockerfile"
ensure "$rabbitmq_image" "$rabbitmq_recipe" build_from_dockerfile "$rabbitmq_image" "$rabbitmq_recipe" "$rabbitmq_dockerfile"

# ---- the ide profile's workspace image, when this machine has none -----------------------------
# The stack's default profile (ide) runs `drape/workstation-python:latest`, which cannot be pulled
# here. When no image of that name exists, a stand-in is built on scripts/test-images.sh's busybox:
# HTTP on 8080 with GET /health answering 200, a `coder` user with uid 1000, a shell. It carries
# the label berth.stand-in=true; an image of that name that is not a stand-in is never touched.
workstation_image=drape/workstation-python:latest
workstation_dockerfile=$(cat <<'DOCKER'
FROM berth-test/busybox:latest
RUN ["/bin/sh", "-c", "mkdir -p /srv /home/coder/project && echo ok > /srv/health && echo 'coder:x:1000:1000:coder:/home/coder:/bin/sh' >> /etc/passwd && echo 'coder:x:1000:' >> /etc/group"]
USER 1000:1000
WORKDIR /home/coder/project
EXPOSE 8080
CMD ["/bin/httpd", "-f", "-p", "8080", "-h", "/srv"]
DOCKER
)
if ! docker image inspect "$workstation_image" >/dev/null 2>&1 \
  || [ "$(docker image inspect -f '{{index .Config.Labels "berth.stand-in"}}' "$workstation_image")" = true ]; then
  docker image inspect berth-test/busybox:latest >/dev/null 2>&1 || "$here/scripts/test-images.sh"
  workstation_recipe=$(printf '%s\n%s\n' "$(docker image inspect -f '{{.Id}}' berth-test/busybox:latest)" "$workstation_dockerfile" | sha256sum | cut -c1-16)
  ensure "$workstation_image" "$workstation_recipe" build_from_dockerfile "$workstation_image" "$workstation_recipe" \
    "$workstation_dockerfile
LABEL berth.stand-in=true"
else
  log "$workstation_image: present (not a stand-in), used as it is"
fi

# ---- Berth: compose/Dockerfile's runtime stage with the host's binary -----------------------
# Debian's Docker has no BuildKit (no buildx), and the legacy builder builds every stage before the
# target, so the Rust `build` stage (whose image is not here) is cut out of the published
# Dockerfile: its global ARGs and every other stage are built as they are, in a context holding
# only what the runtime stage copies.
runtime_dockerfile() {
  python3 - "$here/compose/Dockerfile" <<'PYTHON'
import re, sys
text = open(sys.argv[1]).read()
parts = re.split(r"(?m)^(?=FROM )", text)
preamble, stages = parts[0], parts[1:]
kept = [line for line in preamble.splitlines() if line.startswith("ARG ")]
names = [re.match(r"FROM \S+ AS (\S+)", stage, re.I) for stage in stages]
if not any(name and name.group(1) == "runtime" for name in names):
    sys.exit("compose/Dockerfile has no stage named runtime")
for stage, name in zip(stages, names):
    if name and name.group(1) == "build":
        continue
    if re.search(r"--from=build\b", stage):
        sys.exit("a stage other than `binary` copies from the build stage: the local image cannot be built")
    kept.append(stage.rstrip())
print("\n".join(kept))
PYTHON
}
if [ -n "$binary" ]; then
  [ -x "$binary" ] || { log "no executable $binary"; exit 1; }
  started=$SECONDS
  mkdir -p "$workdir/binary" "$workdir/berth"
  cp "$binary" "$workdir/binary/berth"
  printf 'FROM scratch\nCOPY berth /out/berth\n' >"$workdir/binary/Dockerfile"
  docker build -q -t berth-local/berth-binary:compose "$workdir/binary" >"$workdir/build.log" 2>&1 \
    || { tail -n 30 "$workdir/build.log" >&2; exit 1; }
  runtime_dockerfile >"$workdir/berth/Dockerfile"
  cp -r "$here/patterns" "$here/run-profiles" "$workdir/berth/"
  docker build -q \
    --build-arg RUNTIME_IMAGE="$base_image" \
    --build-arg BERTH_BINARY_FROM=berth-local/berth-binary:compose \
    -t "$berth_image" "$workdir/berth" >"$workdir/build.log" 2>&1 \
    || { tail -n 30 "$workdir/build.log" >&2; exit 1; }
  log "$berth_image: built in $((SECONDS - started)) s"
  # Each rebuild leaves the previous two images dangling (~450 MB a run): drop them.
  docker image prune -f >/dev/null 2>&1 || true
fi
