#!/usr/bin/env bash
# The seed's walkthrough on one host: installs what is missing, then starts etcd, a private
# Docker daemon, discoverd (register + discover with HAProxy) and whoami containers, and shows
# requests alternating between backends on 127.0.0.1:8000. Options: --keep, --port, --stats-port.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec .venv/bin/python scripts/demo.py "$@"
