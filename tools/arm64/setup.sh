#!/usr/bin/env bash
# Prepare the aarch64 emulation used by `make arm64-check` (idempotent; cached in artifacts/arm64/).
#
#   1. qemu-user >= 8.2 on the host (bookworm's 7.2 crashes onnxruntime and XNNPACK; the
#      bookworm-backports 10.x works), and mmdebstrap. Installed with apt-get when missing (needs root).
#   2. an arm64 Debian bookworm userland with python3.11, unpacked (never booted) into
#      artifacts/arm64/rootfs by `mmdebstrap --variant=extract`.
#   3. aarch64 wheels of the runtime's pinned dependencies, installed by the host's pip into
#      artifacts/arm64/site (pure download + unpack: nothing is built or run on the host).
#
# Usage: tools/arm64/setup.sh [PYTHON]   (PYTHON: the host interpreter whose pip is used;
#        default .venv/bin/python). Prints the paths it prepared. Exit 0 when ready.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${1:-.venv/bin/python}
CACHE=${ARM64_CACHE:-artifacts/arm64}
ROOTFS=$CACHE/rootfs
SITE=$CACHE/site
PIN=requirements/runtime.txt
SUITE=bookworm
QEMU_MIN=8.2

log() { echo "arm64-setup: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_get() { as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }

qemu_version() {  # "10.0.2" or empty
    command -v qemu-aarch64 >/dev/null 2>&1 || return 0
    qemu-aarch64 --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -n1
}

version_ge() {  # version_ge A B: A >= B
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# --- 1. host tools ---------------------------------------------------------------------------
have=$(qemu_version)
if [ -z "$have" ] || ! version_ge "$have" "$QEMU_MIN" || ! command -v mmdebstrap >/dev/null; then
    log "installing qemu-user (>= $QEMU_MIN, from $SUITE-backports) and mmdebstrap"
    if ! grep -rqs "$SUITE-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        as_root tee /etc/apt/sources.list.d/ct-edge-backports.sources >/dev/null <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    apt_get update -qq
    # No recommends: binfmt registration is neither needed (qemu-aarch64 is called directly)
    # nor wanted on a shared machine.
    apt_get install -y -qq --no-install-recommends -t "$SUITE-backports" qemu-user >/dev/null
    apt_get install -y -qq --no-install-recommends mmdebstrap >/dev/null
    have=$(qemu_version)
    if [ -z "$have" ] || ! version_ge "$have" "$QEMU_MIN"; then
        log "qemu-aarch64 ${have:-missing} is older than $QEMU_MIN; onnxruntime/XNNPACK crash on it"
        exit 1
    fi
fi
log "qemu-aarch64 $have"

# --- 2. arm64 userland -----------------------------------------------------------------------
if [ ! -x "$ROOTFS/usr/bin/python3.11" ]; then
    log "unpacking an arm64 $SUITE userland into $ROOTFS (about 30 s)"
    rm -rf "$ROOTFS.partial"
    mkdir -p "$CACHE"
    # mmdebstrap checks the GPG signatures with the host's Debian keyring.
    as_root mmdebstrap --quiet --variant=extract --architectures=arm64 \
        --include=python3,libstdc++6 \
        "$SUITE" "$ROOTFS.partial" http://deb.debian.org/debian
    mv "$ROOTFS.partial" "$ROOTFS"  # only a complete userland takes the cached name
fi
log "rootfs $ROOTFS"

# --- 3. aarch64 wheels -----------------------------------------------------------------------
pins=$(grep -E '^(numpy|pillow|ai-edge-litert|onnxruntime|pydicom)==' "$PIN" | tr '\n' ' ')
stamp="$SITE/.pins"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$pins" ]; then
    log "installing aarch64 wheels into $SITE: $pins"
    rm -rf "$SITE.partial"
    # shellcheck disable=SC2086  # $pins is a list of requirement specifiers
    "$PY" -m pip install -q --disable-pip-version-check --no-compile --target "$SITE.partial" \
        --only-binary=:all: --implementation cp --python-version 3.11 \
        --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64 \
        --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 $pins
    echo "$pins" > "$SITE.partial/.pins"
    rm -rf "$SITE"
    mv "$SITE.partial" "$SITE"
fi
log "wheels $SITE"
