#!/usr/bin/env bash
# The seed's walkthrough on one host: installs what is missing, then starts etcd, a private
# Docker daemon, discoverd (register + discover with HAProxy) and whoami containers, and shows
# requests alternating between backends on 127.0.0.1:8000. Options: --keep, --port, --stats-port.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# As a module from the repository root: the launchers live in tests/support, not in the package.
exec .venv/bin/python -m scripts.demo "$@"
