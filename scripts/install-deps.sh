#!/usr/bin/env bash
# Install everything discoverd's tests, demo and benchmarks need on a Debian 12 machine (as root):
#   - system packages: Docker Engine, a static busybox (rootfs of the test images), etcd, HAProxy,
#     wrk, curl, iproute2, python3-venv;
#   - a virtualenv at <repo>/.venv with discoverd installed in editable mode plus its test extras.
# Idempotent: apt is skipped when every binary is already there, and pip is skipped when the
# virtualenv was already built from the same pyproject.toml.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# dockerd, haproxy and ip live in sbin directories, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '[install-deps] %s\n' "$*"; }

apt_packages=(docker.io busybox-static etcd-server etcd-client haproxy wrk curl iproute2 python3-venv)
binaries=(dockerd etcd etcdctl haproxy busybox wrk curl ip)

missing=()
for bin in "${binaries[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        missing+=("$bin")
    fi
done
# The test images are built from the host's busybox: it must be the statically linked one.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("busybox-static")
fi

# `python3 -m venv` needs ensurepip, which Debian ships separately in python3-venv.
if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    missing+=("python3-venv")
fi

if ((${#missing[@]} == 0)); then
    log "system packages: all present (${binaries[*]}), skipping apt"
else
    if [[ "$(id -u)" != 0 ]]; then
        log "missing: ${missing[*]}; run this script as root to install them" >&2
        exit 1
    fi
    log "system packages: missing ${missing[*]}; running apt-get update"
    apt-get update -qq
    log "system packages: installing ${apt_packages[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
    for bin in "${binaries[@]}"; do
        if ! command -v "$bin" >/dev/null 2>&1; then
            log "still missing after apt-get install: $bin" >&2
            exit 1
        fi
    done
    log "system packages: installed"
fi

venv="$repo_root/.venv"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "virtualenv: reusing .venv"
else
    log "virtualenv: creating .venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
fi

# Re-run pip only when pyproject.toml changed since the last successful install.
stamp="$venv/.discoverd-install-stamp"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]] \
    && "$venv/bin/python" -c 'import importlib.metadata as m; m.version("discoverd")' \
        >/dev/null 2>&1 \
    && [[ -x "$venv/bin/ruff" && -x "$venv/bin/mypy" ]]; then
    log "python packages: up to date (pyproject.toml unchanged)"
else
    log "python packages: pip install -e '.[test]'"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
    printf '%s\n' "$wanted" >"$stamp"
    log "python packages: installed"
fi
log "done"
