#!/usr/bin/env bash
# Validates the compose stack and its Dockerfile without pulling or building an image (our machines
# cannot pull): `docker-compose config` renders the file, then structural checks on the rendered
# stack, the run-profiles it names and the Dockerfile. Prints one line per problem; exits non-zero
# when there is any.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
compose_file="$here/compose/docker-compose.yml"
problems=0
fail() { printf 'compose-check: FAIL: %s\n' "$*" >&2; problems=$((problems + 1)); }
note() { printf 'compose-check: %s\n' "$*" >&2; }

if command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  fail "neither docker-compose nor the docker compose plugin is installed (apt-get install docker-compose)"
  exit 1
fi
# A placeholder for the one variable the stack requires; never a real secret.
placeholder_secret=compose-check-placeholder

# 1. The file renders.
if ! render_errors=$(BERTH_JWT_SECRET=$placeholder_secret "${compose[@]}" -f "$compose_file" config -q 2>&1); then
  fail "docker-compose config refuses $compose_file: $render_errors"
  exit 1
fi

# 2. It refuses to render without the token secret: the session agent must never start without one.
if env -u BERTH_JWT_SECRET "${compose[@]}" -f "$compose_file" config -q >/dev/null 2>&1; then
  fail "the stack renders without BERTH_JWT_SECRET; it must require it (\${BERTH_JWT_SECRET:?...})"
fi

# 3. It renders with every shipped profile selected.
for profile_dir in "$here"/run-profiles/*/; do
  profile=$(basename "$profile_dir")
  if ! errors=$(BERTH_PROFILE=$profile BERTH_JWT_SECRET=$placeholder_secret "${compose[@]}" -f "$compose_file" config -q 2>&1); then
    fail "does not render with BERTH_PROFILE=$profile: $errors"
  fi
done

# 4. Structure of the rendered stack, the profiles it names and the Dockerfile.
rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
BERTH_JWT_SECRET=$placeholder_secret "${compose[@]}" -f "$compose_file" config >"$rendered"

# The highest `rust-version` among the locked crates, read from the sources cargo has downloaded
# (no cargo call: that could rewrite Cargo.lock). Crates never downloaded (other platforms') are skipped.
highest_dependency_rust_version=$(python3 - "$here/Cargo.lock" "${CARGO_HOME:-$HOME/.cargo}/registry/src" <<'PYTHON'
import pathlib, re, sys, tomllib
lock = tomllib.loads(pathlib.Path(sys.argv[1]).read_text())
registries = [path for path in pathlib.Path(sys.argv[2]).glob("*") if path.is_dir()]
highest = None
for package in lock.get("package", []):
    if "registry" not in package.get("source", ""):
        continue
    for registry in registries:
        manifest = registry / f"{package['name']}-{package['version']}" / "Cargo.toml"
        if manifest.is_file():
            found = re.search(r'^rust-version\s*=\s*"([0-9.]+)"', manifest.read_text(), re.M)
            if found:
                version = tuple(int(part) for part in found.group(1).split(".")) + (0, 0)
                highest = max(highest or version[:3], version[:3])
            break
print(".".join(map(str, highest)) if highest else "")
PYTHON
)
if [ -z "$highest_dependency_rust_version" ]; then
  note "no downloaded crate sources (run a cargo build first): the Rust version check is skipped"
fi
host_target=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')

# 4a. The Dockerfile's dependency-cache stage, replayed without Docker: only the manifests it
# copies, the placeholder sources it creates, then what cargo would resolve from them. A new crate
# or an explicit target the placeholders lack shows up here instead of in a user's `docker build`.
if command -v cargo >/dev/null 2>&1 && [ -n "$highest_dependency_rust_version" ]; then  # crates downloaded: --offline works
  stage=$(mktemp -d)
  trap 'rm -f "$rendered"; rm -rf "$stage"' EXIT
  manifests=$(sed -n 's/^COPY \(\([a-z_/-]*\/\)\?Cargo\.toml\)\( Cargo\.lock\)\? .*/\1\3/p' "$here/compose/Dockerfile")
  for manifest in $manifests; do
    mkdir -p "$stage/$(dirname "$manifest")" && cp "$here/$manifest" "$stage/$manifest"
  done
  placeholder_crates=$(sed -n 's/^RUN for crate in \(.*\); do.*/\1/p' "$here/compose/Dockerfile")
  for crate in $placeholder_crates; do mkdir -p "$stage/$crate/src" && touch "$stage/$crate/src/lib.rs"; done
  mkdir -p "$stage/src" && echo 'fn main() {}' >"$stage/src/main.rs"
  if ! errors=$(cd "$stage" && cargo metadata --format-version 1 --locked --offline --filter-platform "${host_target:-x86_64-unknown-linux-gnu}" 2>&1 >/dev/null); then
    fail "the Dockerfile's dependency stage does not resolve from the manifests it copies: $(printf '%s' "$errors" | tail -n 3)"
  fi
fi

if ! python3 - "$here" "$rendered" "$highest_dependency_rust_version" <<'PYTHON'
import pathlib, re, sys, tomllib
import yaml

root = pathlib.Path(sys.argv[1])
stack = yaml.safe_load(pathlib.Path(sys.argv[2]).read_text())
highest_dependency_rust_version = sys.argv[3]
services = stack.get("services", {})
problems = []
fail = problems.append

def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env

def command(service):
    value = service.get("command") or []
    return value.split() if isinstance(value, str) else [str(part) for part in value]

def mounts(service):
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            yield str(volume.get("source", "")), str(volume.get("target", ""))
        else:
            parts = str(volume).split(":")
            yield parts[0], parts[1] if len(parts) > 1 else parts[0]

def version_tuple(text):
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

# The Berth services are the ones built from compose/Dockerfile.
berth = {name: service for name, service in services.items()
         if str((service.get("build") or {}).get("dockerfile", "")).endswith("Dockerfile")}
if not berth:
    fail("no service is built from compose/Dockerfile")
images = {service.get("image") for service in berth.values()}
if len(images) != 1:
    fail(f"the Berth services must share one image, got {sorted(map(str, images))}")
one_shot = {name for name, service in services.items() if str(service.get("restart", "no")) == "no"}
long_running_berth = {name: service for name, service in berth.items() if name not in one_shot}

# Every profile the stack names exists.
named_profiles = set()
for name, service in services.items():
    if environment(service).get("BERTH_PROFILE"):
        named_profiles.add(environment(service)["BERTH_PROFILE"])
    arguments = command(service)
    for index, argument in enumerate(arguments):
        if argument == "--profile" and index + 1 < len(arguments):
            named_profiles.add(arguments[index + 1])
        elif argument.startswith("--profile="):
            named_profiles.add(argument.split("=", 1)[1])
named_profiles |= set(re.findall(r"\$\{BERTH_PROFILE:-([^}]+)\}", (root / "compose/docker-compose.yml").read_text()))
if not named_profiles:
    fail("no service names a run-profile (BERTH_PROFILE)")
profiles = {}
for profile in sorted(named_profiles):
    path = root / "run-profiles" / profile / "profile.toml"
    if not path.is_file():
        fail(f"profile {profile!r} is named in the compose file but {path.relative_to(root)} does not exist")
for path in sorted((root / "run-profiles").glob("*/profile.toml")):
    try:
        profiles[path.parent.name] = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        fail(f"{path.relative_to(root)} is not TOML: {error}")

# Bootstrap: one shot, after healthy infrastructure, never dropping data by default.
bootstrap = services.get("bootstrap")
if bootstrap is None:
    fail("no bootstrap service")
else:
    if str(bootstrap.get("restart")) != "no":
        fail('bootstrap must have restart: "no"')
    if command(bootstrap)[:1] != ["bootstrap"]:
        fail(f"bootstrap runs {command(bootstrap)}, expected `bootstrap`")
    if "--reset" in command(bootstrap):
        fail("bootstrap must not pass --reset: that drops stored records on every start")
    for infrastructure in ("mongo", "redis", "rabbitmq"):
        if (bootstrap.get("depends_on") or {}).get(infrastructure, {}).get("condition") != "service_healthy":
            fail(f"bootstrap must wait for {infrastructure} to be healthy")

# The engine and one service per agent kind.
commands = {" ".join(command(service)): name for name, service in long_running_berth.items()}
for expected in ("engine", "agent container", "agent workspace", "agent persistence", "agent session"):
    if expected not in commands:
        fail(f"no long-running service runs `berth {expected}`")

# Long-running Berth services: after bootstrap, health-checked, limited, configured, not root.
for name, service in long_running_berth.items():
    if (service.get("depends_on") or {}).get("bootstrap", {}).get("condition") != "service_completed_successfully":
        fail(f"{name} must depend on bootstrap with condition service_completed_successfully")
    if not (service.get("healthcheck") or {}).get("test"):
        fail(f"{name} has no healthcheck")
    env = environment(service)
    for variable in ("BERTH_PROFILE", "BERTH_AMQP_URL", "BERTH_REDIS_URL", "BERTH_STORE_URL"):
        if not env.get(variable):
            fail(f"{name} does not set {variable}")
    # Passed through from the shell when set; otherwise the profile's own store applies.
    if "BERTH_OBJECT_STORE_URL" not in env:
        fail(f"{name} does not pass BERTH_OBJECT_STORE_URL through")
    if not str(env.get("BERTH_STORE_URL", "")).startswith("mongodb://"):
        fail(f"{name}: BERTH_STORE_URL must be the stack's MongoDB, got {env.get('BERTH_STORE_URL')!r}")
    if str(service.get("user", "")).split(":")[0] in ("0", "root"):
        # The container agent alone, for NET_ADMIN (egress rules): Docker gives added capabilities
        # to root only. Nothing else may be added, and the rest of the hardening stays.
        hardened = (set(service.get("cap_drop") or []) == {"ALL"} and set(service.get("cap_add") or []) <= {"NET_ADMIN"}
                    and service.get("read_only") is True and "no-new-privileges:true" in (service.get("security_opt") or []))
        if " ".join(command(service)) != "agent container" or not hardened:
            fail(f"{name} runs as root (only the container agent may, with cap_drop ALL, at most NET_ADMIN, read-only, no-new-privileges)")

# Resource limits on everything that keeps running.
for name, service in services.items():
    if name in one_shot:
        continue
    limits = ((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}
    if not (limits.get("memory") or service.get("mem_limit")) or not (limits.get("cpus") or service.get("cpus")):
        fail(f"{name} has no memory and CPU limits")

# Only the orchestrator gets the Docker socket.
for name, service in services.items():
    for source, target in mounts(service):
        if "docker.sock" in source or "docker.sock" in target:
            if commands.get("agent container") != name:
                fail(f"{name} mounts the Docker socket; only the container agent may")

# The workspace root is mounted at the same path as on the host, where it is used.
for kind in ("agent container", "agent workspace"):
    name = commands.get(kind)
    if name is None:
        continue
    workspace_root = environment(services[name]).get("BERTH_WORKSPACE_ROOT")
    if not workspace_root:
        fail(f"{name} does not set BERTH_WORKSPACE_ROOT")
    elif (workspace_root, workspace_root) not in set(mounts(services[name])):
        fail(f"{name} must mount {workspace_root} at the same path inside (bind mounts name host paths)")

# The session agent: the secret every profile names, published, health-checked over HTTP.
session_name = commands.get("agent session")
if session_name:
    session = services[session_name]
    env = environment(session)
    for profile_name, profile in profiles.items():
        key_variable = profile.get("session", {}).get("jwt_key_env")
        if key_variable and not env.get(key_variable):
            fail(f"{session_name} does not set {key_variable}, which profile {profile_name} reads user-token keys from")
    port = str(env.get("BERTH_SESSION_ADDR", "")).rsplit(":", 1)[-1]
    if not port.isdigit():
        fail(f"{session_name} must set BERTH_SESSION_ADDR to a listen address with a port")
    else:
        published = [str(mapping.get("target")) if isinstance(mapping, dict) else str(mapping).rsplit(":", 1)[-1].split("/")[0]
                     for mapping in session.get("ports") or []]
        if port not in published:
            fail(f"{session_name} does not publish its port {port}")
        test = " ".join(map(str, (session.get("healthcheck") or {}).get("test") or []))
        if not ("/healthz" in test or "/readyz" in test) or port not in test:
            fail(f"{session_name}'s healthcheck must GET /healthz or /readyz on port {port}")

# Infrastructure as the design needs it.
mongo, redis, rabbitmq = services.get("mongo"), services.get("redis"), services.get("rabbitmq")
if mongo is None or "--replSet" not in command(mongo) or "rs.initiate" not in str((mongo.get("healthcheck") or {}).get("test")):
    fail("mongo must run as a replica set (--replSet) with a healthcheck that initiates it")
if redis is None:
    fail("no redis service")
else:
    redis_command = command(redis)
    if "--appendonly" not in redis_command or redis_command[redis_command.index("--appendonly") + 1] != "yes":
        fail("redis must run with --appendonly yes")
    if "--appendfsync" not in redis_command or redis_command[redis_command.index("--appendfsync") + 1] != "everysec":
        fail("redis must run with --appendfsync everysec")
    if "--notify-keyspace-events" not in redis_command:
        fail("redis must enable keyspace notifications (--notify-keyspace-events)")
    else:
        flags = redis_command[redis_command.index("--notify-keyspace-events") + 1]
        if "x" not in flags or not ("E" in flags or "K" in flags):
            fail(f"redis keyspace notifications {flags!r} do not include expiry events (Ex)")
if rabbitmq is None or "management" not in str(rabbitmq.get("image")) or not rabbitmq.get("healthcheck"):
    fail("rabbitmq must use a management image and have a healthcheck")
for name in ("mongo", "redis", "rabbitmq"):
    if name in services and not services[name].get("healthcheck"):
        fail(f"{name} has no healthcheck")

# The Dockerfile: multi-stage, every workspace crate known to the dependency-cache stage, non-root,
# only the binary, patterns and profiles in the final image, a Rust new enough for the lockfile.
dockerfile_path = root / "compose/Dockerfile"
dockerfile = dockerfile_path.read_text()
if len(re.findall(r"^FROM ", dockerfile, re.M)) < 2:
    fail("compose/Dockerfile must be multi-stage")
manifest = tomllib.loads((root / "Cargo.toml").read_text())
for member in manifest["workspace"]["members"]:
    if f"COPY {member}/Cargo.toml {member}/" not in dockerfile:
        fail(f"compose/Dockerfile does not copy {member}/Cargo.toml into its dependency-cache stage")
    if not re.search(rf"for crate in [^;]*\b{re.escape(member)}\b", dockerfile):
        fail(f"compose/Dockerfile creates no placeholder source for {member}")
    if not (root / member / "src/lib.rs").is_file():
        fail(f"{member} has no src/lib.rs: the Dockerfile's placeholder stage assumes library crates")
final_stage = dockerfile.rsplit("\nFROM ", 1)[-1]
users = re.findall(r"^USER\s+(\S+)", final_stage, re.M)
if not users or users[-1].split(":")[0] in ("0", "root"):
    fail("the final image must run as a non-root USER")
for required in ("COPY patterns/", "COPY run-profiles/", "COPY --from=binary /out/berth"):
    if required not in final_stage:
        fail(f"the final image lacks `{required}`")
# What users build is the official Debian slim with the binary of the Rust `build` stage; only the
# local test (scripts/compose-images.sh) passes other values for these two arguments.
defaults = dict(re.findall(r"^ARG (RUNTIME_IMAGE|BERTH_BINARY_FROM)=(\S+)", dockerfile, re.M))
if defaults.get("BERTH_BINARY_FROM") != "build":
    fail("compose/Dockerfile must default BERTH_BINARY_FROM to the `build` stage")
if defaults.get("RUNTIME_IMAGE") != "debian:${DEBIAN_RELEASE}-slim":
    fail("compose/Dockerfile must default RUNTIME_IMAGE to debian:${DEBIAN_RELEASE}-slim")
if not re.search(r"^FROM \$\{BERTH_BINARY_FROM\} AS binary$", dockerfile, re.M) or not re.search(r"^FROM \$\{RUNTIME_IMAGE\} AS runtime$", dockerfile, re.M):
    fail("compose/Dockerfile must build `binary` FROM ${BERTH_BINARY_FROM} and `runtime` FROM ${RUNTIME_IMAGE}")
rust_version = re.search(r"^ARG RUST_VERSION=(\S+)", dockerfile, re.M)
if not rust_version:
    fail("compose/Dockerfile must pin ARG RUST_VERSION")
else:
    needed = [manifest.get("workspace", {}).get("package", {}).get("rust-version", "1.0")]
    if highest_dependency_rust_version:
        needed.append(highest_dependency_rust_version)
    for version in needed:
        if version_tuple(rust_version.group(1)) < version_tuple(version):
            fail(f"RUST_VERSION {rust_version.group(1)} is older than the {version} the workspace's crates need")
# One owner for workspace files: the image's user, the owner the workspace-root job sets, and the
# user every profile runs workspaces as are the same uid.
image_uid = re.search(r"^ARG BERTH_UID=(\d+)", dockerfile, re.M)
if not image_uid:
    fail("compose/Dockerfile must set the image user's uid with ARG BERTH_UID")
else:
    uid = image_uid.group(1)
    workspace_root_job = services.get("workspace-root")
    if workspace_root_job is None or f"chown {uid}:" not in " ".join(command(workspace_root_job)):
        fail(f"the workspace-root job must hand the workspace root to uid {uid}, the image's user")
    for profile_name, profile in profiles.items():
        profile_user = str(profile.get("container", {}).get("user", ""))
        if profile_user.split(":")[0] != uid:
            fail(f"profile {profile_name} runs workspaces as {profile_user or 'the image user'}, not uid {uid} which owns the workspace files")
dockerignore = root / "compose/Dockerfile.dockerignore"
if not dockerignore.is_file() or "target" not in dockerignore.read_text():
    fail("compose/Dockerfile.dockerignore must exist and exclude target/")

# The documentation stays true: every variable the stack reads is in compose/README.md, and every
# setting of compose/example.env is one the stack reads.
compose_text = (root / "compose/docker-compose.yml").read_text()
readme_text = (root / "compose/README.md").read_text()
# `$${NAME}` is the container's own shell variable, not a substitution.
substituted = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", compose_text))
passed_through = set(re.findall(r"^\s+([A-Z_][A-Z0-9_]*):\s*$", compose_text, re.M))
for variable in sorted(substituted | passed_through):
    if f"`{variable}`" not in readme_text:
        fail(f"compose/README.md does not document {variable}, which the stack reads")
# Bus identities: no AMQP URL in the stack carries credentials (each service connects as its own
# user with the password the secrets job generated, never as guest).
for url in re.findall(r"amqps?://[^\s\"']*", compose_text):
    if "@" in url:
        fail(f"the stack names an AMQP URL with credentials ({url}): services connect as their own bus identities")
example = root / "compose/example.env"
if example.is_file():
    for line in example.read_text().splitlines():
        setting = re.match(r"^#?\s*([A-Z_][A-Z0-9_]*)=", line)
        if setting and setting.group(1) not in substituted | passed_through:
            fail(f"compose/example.env sets {setting.group(1)}, which the stack never reads")
        # The placeholder secret the stack must refuse is the one example.env ships.
        if setting and setting.group(1) == "BERTH_JWT_SECRET":
            placeholder = line.split("=", 1)[1].strip()
            secrets_job = " ".join(services.get("secrets", {}).get("command") or [])
            if f'= {placeholder} ]' not in secrets_job:
                fail(f"the secrets job must refuse compose/example.env's BERTH_JWT_SECRET placeholder {placeholder!r}")
        if setting and setting.group(1) == "BERTH_PROFILE":
            example_profile = line.split("=", 1)[1].strip()
            if not (root / "run-profiles" / example_profile / "profile.toml").is_file():
                fail(f"compose/example.env names profile {example_profile!r}, which does not exist")

for problem in problems:
    print(f"compose-check: FAIL: {problem}", file=sys.stderr)
print(f"compose-check: {len(services)} services, profiles named: {', '.join(sorted(named_profiles))}", file=sys.stderr)
sys.exit(1 if problems else 0)
PYTHON
then
  problems=$((problems + 1))
fi

# 5. The override the compose test runs with (compose/docker-compose.local.yml) swaps image sources
# only: rendered on top of the published file, every service keeps its command, healthcheck, volumes,
# limits, ports and dependencies; the differences allowed are the images, the SQLite store (its URL
# and its volume) and MongoDB left out (zero replicas).
override_file="$here/compose/docker-compose.local.yml"
if [ -f "$override_file" ]; then
  merged=$(mktemp)
  trap 'rm -f "$rendered" "$merged"; rm -rf "${stage:-}"' EXIT
  if ! errors=$(BERTH_JWT_SECRET=$placeholder_secret "${compose[@]}" -f "$compose_file" -f "$override_file" config 2>&1 >"$merged"); then
    fail "the stack does not render with compose/docker-compose.local.yml: $errors"
  elif ! python3 - "$rendered" "$merged" "$here/compose/README.md" <<'PYTHON'
import copy, pathlib, sys
import yaml

base = yaml.safe_load(pathlib.Path(sys.argv[1]).read_text())
merged = yaml.safe_load(pathlib.Path(sys.argv[2]).read_text())
readme = pathlib.Path(sys.argv[3]).read_text()
problems = []
store_volume = "store-data:/var/lib/berth/store:rw"

if set(merged.get("services", {})) != set(base.get("services", {})):
    problems.append(f"the override changes the set of services: {sorted(set(merged['services']) ^ set(base['services']))}")
for name, service in merged.get("services", {}).items():
    original = base["services"].get(name)
    if original is None:
        continue
    service, original = copy.deepcopy(service), copy.deepcopy(original)
    for side in (service, original):
        side.pop("image", None)
        # Rendering noise of a merge: `berth: null` becomes `berth: {}`, lists come back reordered.
        if isinstance(side.get("networks"), dict):
            side["networks"] = {key: value or {} for key, value in side["networks"].items()}
        for key, value in side.items():
            if isinstance(value, list) and all(isinstance(item, str) for item in value) and key not in ("command", "entrypoint"):
                side[key] = sorted(value)
    environment = service.get("environment") or {}
    if "BERTH_STORE_URL" in environment and environment["BERTH_STORE_URL"] != (original.get("environment") or {}).get("BERTH_STORE_URL"):
        if not str(environment["BERTH_STORE_URL"]).startswith("sqlite:///var/lib/berth/store/"):
            problems.append(f"{name}: the override's store must be SQLite under /var/lib/berth/store, got {environment['BERTH_STORE_URL']!r}")
        environment["BERTH_STORE_URL"] = original["environment"]["BERTH_STORE_URL"]
    volumes = service.get("volumes") or []
    if store_volume in volumes and store_volume not in (original.get("volumes") or []):
        volumes.remove(store_volume)
        if not volumes:
            service.pop("volumes")
    if name == "mongo":
        if (service.get("deploy") or {}).get("replicas") != 0:
            problems.append("the override must leave mongo out with deploy.replicas: 0")
        service.get("deploy", {}).pop("replicas", None)
    for key in sorted(set(service) | set(original)):
        if service.get(key) != original.get(key):
            problems.append(f"{name}: the override changes {key!r}; it may only swap image sources (and the store)")
if set(merged.get("volumes") or {}) - set(base.get("volumes") or {}) - {"store-data"}:
    problems.append("the override adds volumes other than store-data")
if "docker-compose.local.yml" not in readme:
    problems.append("compose/README.md does not describe compose/docker-compose.local.yml")
for problem in problems:
    print(f"compose-check: FAIL: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PYTHON
  then
    problems=$((problems + 1))
  fi
fi

# The second-host stack: it renders with its four required variables, refuses to render without
# them, and runs a host's agents and its door only (no broker, no Redis, no store, no engine).
host_file="$here/compose/docker-compose.host.yml"
host_env=(BERTH_HOST=h2 BERTH_CONTROL_PLANE=10.0.0.1 BERTH_PUBLISH_ADDRESS=10.0.0.2 BERTH_JWT_SECRET=$placeholder_secret)
if ! host_errors=$(env "${host_env[@]}" "${compose[@]}" -f "$host_file" config -q 2>&1); then
  fail "docker-compose config refuses $host_file: $host_errors"
elif env -u BERTH_HOST "${compose[@]}" -f "$host_file" config -q >/dev/null 2>&1; then
  fail "$host_file renders without BERTH_HOST: a host must name itself"
elif env "${host_env[@]}" -u BERTH_JWT_SECRET "${compose[@]}" -f "$host_file" config -q >/dev/null 2>&1; then
  fail "$host_file renders without BERTH_JWT_SECRET: its door must never start without one"
else
  host_services=$(env "${host_env[@]}" "${compose[@]}" -f "$host_file" config --services | sort | tr '\n' ' ')
  [ "$host_services" = "container-agent session-agent workspace-agent workspace-root " ] \
    || fail "$host_file runs $host_services; a second host runs its container and workspace agents and its door only"
fi

if [ "$problems" -gt 0 ]; then
  note "$problems problem(s) in compose/"
  exit 1
fi
note "ok: compose/docker-compose.yml, compose/docker-compose.host.yml and compose/Dockerfile pass every check"
