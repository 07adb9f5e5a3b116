#!/usr/bin/env bash
# Builds the test images FROM scratch with Debian's static busybox (no image can be pulled here).
# berth-test/busybox:  a workspace that serves HTTP on 8080 from /workspace (httpd).
# berth-test/unhealthy: a workspace whose service never answers (for the failure path).
# berth-test/proxy-app: the proxy tests' app on 8080 (agents/session/examples/proxy-test-app.rs:
#                      echoes paths and headers at /, streams /large, counts /upload, echoes /ws);
#                      the example binary and the shared libraries it links, FROM scratch.
# berth-test/oom:      busybox httpd whose main process turns into a memory hog once
#                      /workspace/oom-now exists (the fault tests' OOM kill of a main process).
set -euo pipefail
here_root=$(cd "$(dirname "$0")/.." && pwd)
busybox=/bin/busybox
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$busybox" "$ctx/busybox"
cat >"$ctx/Dockerfile" <<'DOCKER'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/sh", "-c", "mkdir -p /tmp /workspace /etc && echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd && echo 'user:x:1000:1000:user:/workspace:/bin/sh' >> /etc/passwd && echo 'root:x:0:' > /etc/group && echo 'user:x:1000:' >> /etc/group"]
ENV PATH=/bin
EXPOSE 8080
CMD ["/bin/httpd", "-f", "-p", "8080", "-h", "/workspace"]
DOCKER
if ! docker image inspect berth-test/busybox:latest >/dev/null 2>&1; then
  docker build -q -t berth-test/busybox:latest "$ctx" >/dev/null
fi
if ! docker image inspect berth-test/unhealthy:latest >/dev/null 2>&1; then
  printf 'FROM berth-test/busybox:latest\nCMD ["/bin/sleep", "3600"]\n' | docker build -q -t berth-test/unhealthy:latest - >/dev/null
fi
if ! docker image inspect berth-test/oom:latest >/dev/null 2>&1; then
  printf '%s\n' 'FROM berth-test/busybox:latest' \
    'CMD ["/bin/sh", "-c", "httpd -p 8080 -h /workspace && while [ ! -e /workspace/oom-now ]; do sleep 0.5; done; exec tail /dev/zero"]' \
    | docker build -q -t berth-test/oom:latest - >/dev/null
fi
# Rebuilt whenever the example changed (cargo is quick when it did not; the image build too).
(cd "$here_root" && cargo build -q -p session --example proxy-test-app)
app_binary="${CARGO_TARGET_DIR:-$here_root/target}/debug/examples/proxy-test-app"
app_ctx="$ctx/proxy-app"
mkdir -p "$app_ctx/root/app"
cp "$app_binary" "$app_ctx/root/app/proxy-test-app"
for library in $(ldd "$app_binary" | grep -Eo '/[^ ]+'); do
  mkdir -p "$app_ctx/root$(dirname "$library")"
  cp -L "$library" "$app_ctx/root$library"
done
printf '%s\n' 'FROM scratch' 'COPY root/ /' 'EXPOSE 8080' 'CMD ["/app/proxy-test-app"]' >"$app_ctx/Dockerfile"
docker build -q -t berth-test/proxy-app:latest "$app_ctx" >/dev/null
