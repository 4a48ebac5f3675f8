#!/usr/bin/env bash
# The benchmark suite of discoverd in one command: installs what is missing
# (scripts/install-deps.sh), runs every script in bench/ against the real services (a private
# Docker daemon, etcd, HAProxy, nginx when its plugin is installed), prints a summary table and
# writes the figures as JSON (one file per script) and Markdown (summary.md) to
# bench/results/<UTC date and time>/ (not committed). Needs root (it starts dockerd).
#
#   bash scripts/bench.sh            # the full suite (about 45 minutes on 2 cores)
#   bash scripts/bench.sh --quick    # a smoke run of every benchmark (a few minutes)
#   bash scripts/bench.sh --only churn,scale [--out DIR]
#
# A benchmark that fails is reported and the others still run; the exit status is then non-zero.
# Timings are reported, never asserted: a missed target does not fail the run.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

all=(time_to_routable time_to_unroutable slow_starter churn scale footprint register fleet failover)
quick=()
only=""
out=""
while (($#)); do
    case "$1" in
        --quick) quick=(--quick) ;;
        --only) only="$2"; shift ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -n "$only" ]]; then
    IFS=, read -r -a selected <<<"$only"
else
    selected=("${all[@]}")
fi
out="${out:-bench/results/$(date -u +%Y-%m-%dT%H%M%SZ)}"

bash scripts/install-deps.sh

venv="$repo_root/.venv"
export PATH="$venv/bin:$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export PYTHONUNBUFFERED=1
mkdir -p "$out"

# Benchmarks that also run a second time, as most users run discoverd: backends without a
# single label (the proxy mode detected) that exit at once on TERM.
declare -A variants=(
    [time_to_unroutable]="--mode auto --backend abrupt"
    [churn]="--mode auto --backend abrupt"
)

failed=()
for name in "${selected[@]}"; do
    if [[ ! -f "bench/$name.py" ]]; then
        echo "unknown benchmark: $name (known: ${all[*]})" >&2
        failed+=("$name")
        continue
    fi
    runs=("$name")
    if [[ -n "${variants[$name]:-}" ]]; then
        runs+=("$name-auto-abrupt")
    fi
    for run in "${runs[@]}"; do
        extra=()
        if [[ "$run" != "$name" ]]; then
            read -r -a extra <<<"${variants[$name]}"
        fi
        printf '\n==> %s %s\n' "$name" "${extra[*]}"
        started=$SECONDS
        rc=0
        "$venv/bin/python" -m "bench.$name" "${quick[@]}" "${extra[@]}" --json "$out/$run.json" \
            2>&1 | tee "$out/$run.log" || rc=$?
        printf '==> %s: exit %d after %d s\n' "$run" "$rc" "$((SECONDS - started))"
        if ((rc != 0)); then
            failed+=("$run")
            # Ctrl-C: the script has cleaned up after itself; do not start the next one.
            if ((rc == 130)); then
                break 2
            fi
        fi
    done
done

printf '\n==> summary (%s)\n' "$out"
"$venv/bin/python" -m bench.report "$out" --markdown "$out/summary.md"
if ((${#failed[@]})); then
    printf '\nfailed: %s (logs in %s)\n' "${failed[*]}" "$out"
    exit 1
fi
printf '\nJSON and Markdown (summary.md) in %s\n' "$out"
