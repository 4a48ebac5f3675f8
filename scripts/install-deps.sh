#!/usr/bin/env bash
# Install everything discoverd's tests, demo and benchmarks need on a Debian 12 machine (as root):
#   - system packages: Docker Engine, a static busybox (rootfs of the test images), etcd, HAProxy,
#     nginx with its stream module, wrk, curl, iproute2, python3-venv; for the unit checks,
#     systemd-analyze (the systemd package) and strace where they are missing;
#   - Consul 1.8.7, which Debian 12 lacks: the bullseye package is fetched from the machine's own
#     Debian mirror into a temporary folder (the apt setup is left untouched) and its binary is
#     installed as /usr/local/bin/consul;
#   - a virtualenv at <repo>/.venv with discoverd installed in editable mode plus its test extras.
# Idempotent: apt is skipped when every binary is already there, and pip is skipped when the
# virtualenv was already built from the same pyproject.toml.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# dockerd, haproxy and ip live in sbin directories, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '[install-deps] %s\n' "$*"; }

apt_packages=(docker.io busybox-static etcd-server etcd-client haproxy nginx-light libnginx-mod-stream
    wrk curl iproute2 python3-venv)
binaries=(dockerd etcd etcdctl haproxy nginx busybox wrk curl ip)
stream_module=/usr/lib/nginx/modules/ngx_stream_module.so

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

# nginx proxies TCP and UDP services through its dynamic stream module.
if [[ ! -f "$stream_module" ]]; then
    missing+=("libnginx-mod-stream")
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
# The checks of the systemd units (tests/test_deploy.py): systemd-analyze, and strace for the
# system calls the units allow. Debian installs systemd on most machines already; where it is
# missing (a container), its package alone is installed, without recommends: nothing is started
# and the init system is left as it is.
unit_tools=()
command -v systemd-analyze >/dev/null 2>&1 || unit_tools+=(systemd)
command -v strace >/dev/null 2>&1 || unit_tools+=(strace)
if ((${#unit_tools[@]} == 0)); then
    :
elif [[ "$(id -u)" != 0 ]]; then
    log "missing: ${unit_tools[*]} (the unit checks will be skipped); run as root to install" >&2
else
    log "unit checks: installing ${unit_tools[*]} (no recommends)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${unit_tools[@]}" >/dev/null
fi
# The Debian package starts an nginx on port 80 where an init system runs; discoverd runs its own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx || true
fi

install_consul() {
    # The mirror comes from the machine's own apt sources (first URI that is not the security
    # archive) and is only ever held in memory and in the temporary folder.
    local sources=/etc/apt/sources.list.d/debian.sources mirror="" tmp deb
    if [[ -f "$sources" ]]; then
        mirror="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$sources")"
    fi
    if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
        mirror="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' /etc/apt/sources.list | head -n1)"
    fi
    if [[ -z "$mirror" ]]; then
        log "consul: no Debian mirror found in the apt sources; cannot fetch consul" >&2
        return 1
    fi
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/pkg"
    printf 'deb %s bullseye main\n' "$mirror" >"$tmp/sources.list"
    local apt_opts=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache"
        -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
    log "consul: fetching the bullseye package (1.8.7)"
    apt-get "${apt_opts[@]}" update -qq >/dev/null
    (cd "$tmp" && apt-get "${apt_opts[@]}" download consul >/dev/null 2>&1)
    deb="$(ls "$tmp"/consul_*.deb 2>/dev/null | head -n1)"
    if [[ -z "$deb" ]]; then
        log "consul: the bullseye package could not be downloaded" >&2
        return 1
    fi
    dpkg -x "$deb" "$tmp/pkg"
    install -m 0755 "$tmp/pkg/usr/bin/consul" /usr/local/bin/consul
    log "consul: installed $(/usr/local/bin/consul version | head -n1)"
}

if command -v consul >/dev/null 2>&1; then
    log "consul: present ($(consul version | head -n1))"
elif [[ "$(id -u)" != 0 ]]; then
    log "consul: missing; run this script as root to install it" >&2
    exit 1
else
    install_consul
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
