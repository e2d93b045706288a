#!/usr/bin/env bash
# The image, built and run on this machine: the unchanged Dockerfile built with podman against
# local stand-ins for its two base images, then run
#   1. as a pod (one network namespace, like a Kubernetes pod): the sidecar read-only, as uid
#      65532, every capability dropped, config and secrets mounted read-only; an app container
#      that calls http://127.0.0.1:8080 and reaches a stand-in provider over TLS through it;
#      the image's health check; SIGTERM with a request in flight; image size and idle RSS;
#   2. from deploy/compose/docker-compose.yml as written, with podman-compose;
#   3. with `podman kube play deploy/kubernetes/token-sidecar.yaml`, reporting what podman
#      supports of it.
#
# No image registry can be reached here, so the bases are made: the builder from a
# debootstrap bookworm with this machine's Rust toolchain copied in, the runtime with what
# distroless `cc` has (glibc, libgcc, CA certificates, /etc/passwd with uid 65532 `nonroot`,
# no shell). They are cached under target/image-test/ so a second run does not make them again.
#
# Skips (exit 0, saying why) where podman cannot run a container. Run by .ci/run.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$ROOT/target/image-test
HERE=$ROOT/deploy/image-test
mkdir -p "$WORK"
REPORT=$WORK/report.txt
: > "$REPORT"

skip() { echo "SKIPPED deploy/image-test.sh: $*"; exit 0; }
say() { echo "image-test: $*"; }
report() { echo "$*" | tee -a "$REPORT"; }
fail() { echo "image-test: FAILED: $*" >&2; exit 1; }

command -v podman >/dev/null 2>&1 || skip "podman is not installed (apt-get install podman runc debootstrap; .ci/run does)"
command -v debootstrap >/dev/null 2>&1 || skip "debootstrap is not installed"
command -v openssl >/dev/null 2>&1 || skip "openssl (the CLI, for the test's certificates) is not installed"

# podman's defaults fail here (../shared notes: setrlimit refused, crun and hybrid cgroups):
# no default ulimits, and runc.
export CONTAINERS_CONF=$WORK/containers.conf
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
PODMAN=(podman --runtime runc)

BUILDER=docker.io/library/rust:1.95-slim-bookworm
RUNTIME=gcr.io/distroless/cc-debian12:nonroot
TOOLS=docker.io/curlimages/curl:8.11.1
IMAGE=localhost/token-sidecar:0.1.0

# --- the stand-in bases -------------------------------------------------------------------

make_rootfs() {
  local rootfs=$WORK/bases/rootfs
  if [ -f "$WORK/bases/rootfs.done" ]; then return; fi
  say "debootstrap bookworm (once; cached in $WORK/bases)"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates,curl,python3 \
    bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/bases/debootstrap.log" 2>&1 \
    || fail "debootstrap (see $WORK/bases/debootstrap.log)"
  touch "$WORK/bases/rootfs.done"
}

make_builder() {
  if "${PODMAN[@]}" image exists "$BUILDER"; then return; fi
  make_rootfs
  local sysroot
  sysroot=$(rustc --print sysroot)
  say "builder stand-in: the rootfs with this machine's Rust toolchain ($sysroot)"
  local rust=$WORK/bases/rootfs/usr/local/rust
  rm -rf "$rust" && mkdir -p "$rust" "$WORK/bases/rootfs/usr/local/cargo/bin"
  tar -C "$sysroot" --exclude=share/doc --exclude=lib/rustlib/src -cf - . | tar -C "$rust" -xf -
  tar -C "$WORK/bases/rootfs" -cf - . | "${PODMAN[@]}" import \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$BUILDER" > /dev/null
}

make_runtime() {
  if "${PODMAN[@]}" image exists "$RUNTIME"; then return; fi
  make_rootfs
  say "runtime stand-in: what distroless cc has, and nothing else"
  local from=$WORK/bases/rootfs dir=$WORK/bases/runtime
  rm -rf "$dir" && mkdir -p "$dir"/{etc/ssl/certs,lib/x86_64-linux-gnu,lib64,tmp,home/nonroot,usr/share/zoneinfo}
  for lib in libc.so.6 libm.so.6 libgcc_s.so.1 libstdc++.so.6 libdl.so.2 libpthread.so.0 librt.so.1 ld-linux-x86-64.so.2; do
    cp -L "$from/lib/x86_64-linux-gnu/$lib" "$dir/lib/x86_64-linux-gnu/" 2>/dev/null \
      || cp -L "$from/usr/lib/x86_64-linux-gnu/$lib" "$dir/lib/x86_64-linux-gnu/"
  done
  ln -s /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$dir/lib64/ld-linux-x86-64.so.2"
  cp -L "$from/etc/ssl/certs/ca-certificates.crt" "$dir/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$dir/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$dir/etc/group"
  chmod 1777 "$dir/tmp"
  chown 65532:65532 "$dir/home/nonroot"
  [ ! -e "$dir/bin/sh" ] || fail "the runtime stand-in has a shell"
  tar -C "$dir" -cf - . | "${PODMAN[@]}" import --change 'USER 65532' --change 'WORKDIR /home/nonroot' \
    - "$RUNTIME" > /dev/null
}

make_tools() {
  if "${PODMAN[@]}" image exists "$TOOLS"; then return; fi
  make_rootfs
  say "tools stand-in (curl, python3) for the app and the provider, tagged as compose's app image"
  tar -C "$WORK/bases/rootfs" --exclude=./usr/local/rust -cf - . | "${PODMAN[@]}" import - "$TOOLS" > /dev/null
}

# Can podman run a container here at all?
make_runtime
"${PODMAN[@]}" run --rm --network none --entrypoint /lib64/ld-linux-x86-64.so.2 "$RUNTIME" --help > /dev/null 2>&1 \
  || skip "podman cannot run a container here ($("${PODMAN[@]}" run --rm --network none "$RUNTIME" 2>&1 | tail -1))"
make_builder
make_tools

# --- the image, from the unchanged Dockerfile ---------------------------------------------

say "podman build of the unchanged Dockerfile"
build_started=$(date +%s)
"${PODMAN[@]}" build --pull=never --format docker --network host \
  -v "${CARGO_HOME:-$HOME/.cargo}/registry:/usr/local/cargo/registry" \
  -t "$IMAGE" -t localhost/token-sidecar:dev "$ROOT" > "$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; fail "podman build (see $WORK/build.log)"; }
report "image built in $(( $(date +%s) - build_started )) s from the unchanged Dockerfile"
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
report "image size: $(( size / 1024 / 1024 )) MiB ($size bytes; the runtime stand-in alone: $(( $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$RUNTIME") / 1024 / 1024 )) MiB)"
user=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = "65532:65532" ] || fail "the image runs as '$user', not 65532:65532"
health=$("${PODMAN[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
echo "$health" | grep -q probe || fail "the image has no HEALTHCHECK probe: $health"

# --- certificates and secrets for the pod -------------------------------------------------

certs=$WORK/pod
rm -rf "$certs" && mkdir -p "$certs/config" "$certs/secrets" "$certs/provider"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=image-test-ca \
  -keyout "$certs/ca.key" -out "$certs/config/ca.pem" 2> /dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$certs/provider/key.pem" -out "$certs/provider.csr" 2> /dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$certs/san.ext"
openssl x509 -req -in "$certs/provider.csr" -CA "$certs/config/ca.pem" -CAkey "$certs/ca.key" \
  -CAcreateserial -days 2 -extfile "$certs/san.ext" -out "$certs/provider/cert.pem" 2> /dev/null
cp "$HERE/provider.py" "$certs/provider/"
cp "$HERE/sidecar.toml" "$certs/config/sidecar.toml"
secret=pod-client-secret-$RANDOM$RANDOM
printf '%s\n' "$secret" > "$certs/secrets/payu-client-secret"
chmod -R a+rX "$certs"

cleanup() {
  "${PODMAN[@]}" pod rm -f -t 0 ts-image-test > /dev/null 2>&1 || true
  "${PODMAN[@]}" pod rm -f -t 0 payments > /dev/null 2>&1 || true
  "${PODMAN[@]}" pod rm -f -t 0 pod_payments > /dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

# --- 1. a pod, as the Kubernetes example runs it ------------------------------------------

say "a pod: provider, sidecar, app"
"${PODMAN[@]}" pod create --name ts-image-test --network none > /dev/null
# (podman logs an error for each health check timer it cannot hand to systemd: there is none here.)
"${PODMAN[@]}" run -d --pod ts-image-test --name ts-provider -v "$certs/provider:/provider:ro" \
  "$TOOLS" python3 /provider/provider.py "$secret" /provider/cert.pem /provider/key.pem > /dev/null 2>> "$WORK/podman.log"
"${PODMAN[@]}" run -d --pod ts-image-test --name ts-sidecar \
  --read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges \
  -v "$certs/config:/etc/token-sidecar:ro" -v "$certs/secrets:/run/secrets/token-sidecar:ro" \
  "$IMAGE" run > /dev/null 2>> "$WORK/podman.log"

app() { "${PODMAN[@]}" run --rm --pod ts-image-test "$TOOLS" curl -sS --max-time 20 "$@"; }
ready=""
for _ in $(seq 1 60); do
  if "${PODMAN[@]}" exec ts-sidecar /usr/local/bin/token-sidecar probe > /dev/null 2>&1; then ready=yes; break; fi
  sleep 0.5
done
[ -n "$ready" ] || { "${PODMAN[@]}" logs ts-sidecar | tail -20; fail "the sidecar never became ready"; }
if "${PODMAN[@]}" healthcheck run ts-sidecar > /dev/null 2>&1; then
  report "pod: the image's HEALTHCHECK (token-sidecar probe) passes"
else
  report "pod: podman healthcheck run did not pass here; token-sidecar probe by exec did"
fi
answer=$(app http://127.0.0.1:8080/acme/payu/payment-links)
echo "$answer" | grep -q '"token": "pod-token-1"' || fail "the app did not reach the provider through the sidecar: $answer"
report "pod: the app's http://127.0.0.1:8080/acme/payu/payment-links reached the stand-in provider over TLS with the injected token: $answer"
shell=$("${PODMAN[@]}" exec ts-sidecar /bin/sh -c true 2>&1 || true)
echo "$shell" | grep -qiE 'no such file|not found|executable file' || fail "the sidecar container has a shell: $shell"
touch_root=$("${PODMAN[@]}" exec ts-sidecar /usr/local/bin/token-sidecar check --config /etc/token-sidecar/sidecar.toml 2>&1 || true)
echo "$touch_root" | grep -q "config OK" || fail "check inside the container: $touch_root"
caps=$("${PODMAN[@]}" inspect --format '{{.EffectiveCaps}}' ts-sidecar)
report "pod: sidecar runs as $("${PODMAN[@]}" inspect --format '{{.Config.User}}' ts-sidecar), read-only root $("${PODMAN[@]}" inspect --format '{{.HostConfig.ReadonlyRootfs}}' ts-sidecar), capabilities $caps, no shell"
pid=$("${PODMAN[@]}" inspect --format '{{.State.Pid}}' ts-sidecar)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
report "pod: idle RSS of the sidecar: $(( rss / 1024 )) MiB ($rss kB)"

# SIGTERM with a request in flight: it finishes.
app http://127.0.0.1:8080/acme/payu/slow > "$WORK/in-flight.json" 2>&1 &
inflight=$!
sleep 1
stopped=$(date +%s)
"${PODMAN[@]}" stop -t 15 ts-sidecar > /dev/null 2>> "$WORK/podman.log"
wait "$inflight" || true
grep -q '"path": "/payu/slow"' "$WORK/in-flight.json" || fail "the in-flight request did not finish across SIGTERM: $(cat "$WORK/in-flight.json")"
code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' ts-sidecar)
[ "$code" = 0 ] || fail "the sidecar exited $code after SIGTERM"
report "pod: SIGTERM (podman stop) with a 3 s request in flight: it finished with 200, the sidecar exited 0 after $(( $(date +%s) - stopped )) s"
"${PODMAN[@]}" pod rm -f -t 0 ts-image-test > /dev/null 2>> "$WORK/podman.log"

# --- 2. compose, as written ---------------------------------------------------------------

compose=$WORK/compose
rm -rf "$compose" && mkdir -p "$compose"
if ! command -v podman-compose > /dev/null 2>&1; then
  python3 -m pip install --quiet podman-compose > /dev/null 2>&1 || true
fi
if command -v podman-compose > /dev/null 2>&1; then
  # The example as written, and an override for this machine: the stand-in provider in the
  # sidecar's network namespace and the config that points at it (the example's own config
  # points at PayU, which cannot be reached from here).
  cat > "$compose/override.yml" <<EOF
services:
  token-sidecar:
    volumes:
      - $certs/config/sidecar.toml:/etc/token-sidecar/sidecar.toml:ro
      - $certs/config/ca.pem:/etc/token-sidecar/ca.pem:ro
  provider:
    image: $TOOLS
    network_mode: "service:token-sidecar"
    volumes:
      - $certs/provider:/provider:ro
    command: ["python3", "/provider/provider.py", "$secret", "/provider/cert.pem", "/provider/key.pem"]
secrets:
  payu-client-secret:
    file: $certs/secrets/payu-client-secret
EOF
  say "podman-compose up: deploy/compose/docker-compose.yml as written, with the override"
  (cd "$ROOT/deploy/compose" && podman-compose --podman-run-args="--runtime runc" -f docker-compose.yml -f "$compose/override.yml" up -d) \
    > "$compose/up.log" 2>&1 || { tail -20 "$compose/up.log"; fail "podman-compose up"; }
  seen=""
  for _ in $(seq 1 60); do
    if "${PODMAN[@]}" logs payments_app_1 2>/dev/null | grep -q 'pod-token'; then seen=yes; break; fi
    sleep 1
  done
  logs=$("${PODMAN[@]}" logs payments_app_1 2>&1 | tail -3)
  (cd "$ROOT/deploy/compose" && podman-compose -f docker-compose.yml -f "$compose/override.yml" down -t 2) > "$compose/down.log" 2>&1 || true
  [ -n "$seen" ] || fail "the compose app did not reach the provider through the sidecar: $logs"
  report "compose: the app service's curl loop reached the stand-in provider through the sidecar's network namespace: $(echo "$logs" | grep pod-token | tail -1)"
else
  report "compose: SKIPPED: podman-compose could not be installed (python3 -m pip install podman-compose)"
fi

# --- 3. podman kube play ------------------------------------------------------------------

say "podman kube play deploy/kubernetes/token-sidecar.yaml"
kube=$WORK/kube
rm -rf "$kube" && mkdir -p "$kube/secrets"
# What the manifest needs from outside it: its Secret, and the app's image (a stand-in).
cat > "$kube/secret.yaml" <<EOF
apiVersion: v1
kind: Secret
metadata:
  name: payments-token-sidecar
type: Opaque
stringData:
  payu-client-secret: $secret
  nuapay-api-key: kube-play-nuapay-key
EOF
"${PODMAN[@]}" secret rm payments-token-sidecar > /dev/null 2>&1 || true
"${PODMAN[@]}" kube play "$kube/secret.yaml" > "$kube/secret.log" 2>&1 || true
"${PODMAN[@]}" tag "$TOOLS" registry.example/payments-app:1.0.0
kube_play() { # FILE: what podman made of it (its first error line, or the pod's containers)
  if timeout 90 "${PODMAN[@]}" kube play --network none "$1" > "$kube/play.log" 2>&1; then
    echo "accepted: $("${PODMAN[@]}" ps -a --pod --format '{{.Names}}={{.Status}}' | grep payments | tr '\n' ' ')"
  else
    grep -m1 -E '^(panic|Error)' "$kube/play.log" || tail -1 "$kube/play.log"
  fi
  "${PODMAN[@]}" pod rm -f -t 0 payments-pod-0 > /dev/null 2>&1 || true
}
report "kube play, as written: $(kube_play "$ROOT/deploy/kubernetes/token-sidecar.yaml")"
# The same with the Secret volume as a host directory, to see how far podman goes past it.
printf '%s\n' "$secret" > "$kube/secrets/payu-client-secret"
printf 'kube-play-nuapay-key\n' > "$kube/secrets/nuapay-api-key"
python3 "$HERE/hostpath_secret.py" "$ROOT/deploy/kubernetes/token-sidecar.yaml" "$kube/secrets" > "$kube/hostpath.yaml"
report "kube play, the Secret volume as a host directory: $(kube_play "$kube/hostpath.yaml")"
"${PODMAN[@]}" secret rm payments-token-sidecar > /dev/null 2>&1 || true

say "done; the figures are in $REPORT"
