#!/usr/bin/env bash
# The test command of discoverd: installs what is missing (scripts/install-deps.sh), then runs,
# in .venv, `ruff check`, `ruff format --check`, `mypy` and `pytest "$@"`.
# Every step runs even when an earlier one fails; the exit status is non-zero if any failed.
# Nothing here depends on CI: set DISCOVERD_REQUIRE_SERVICES=1 to make tests fail instead of
# skip when Docker, etcd or HAProxy cannot be started (.ci/run does).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/install-deps.sh

venv="$repo_root/.venv"
export PATH="$venv/bin:$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export PYTHONUNBUFFERED=1

failed=()
status=0
run_step() {
    local name="$1"
    shift
    printf '\n==> %s\n' "$name"
    local rc=0
    "$@" || rc=$?
    if ((rc != 0)); then
        printf '==> %s FAILED (exit %d)\n' "$name" "$rc"
        failed+=("$name")
        status=$rc
    fi
}

run_step "ruff check" "$venv/bin/ruff" check src tests scripts bench examples
run_step "ruff format --check" "$venv/bin/ruff" format --check src tests scripts bench examples
run_step "mypy" "$venv/bin/mypy"
run_step "pytest" "$venv/bin/python" -m pytest "$@"

echo
if ((${#failed[@]} > 0)); then
    echo "==> FAILED: ${failed[*]}"
    exit $((status == 0 ? 1 : status))
fi
echo "==> all checks passed"
