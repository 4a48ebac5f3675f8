"""Summarise the JSON files of a benchmark run as a table (printed) and as Markdown.

    .venv/bin/python -m bench.report RESULTS_DIR [--markdown OUT]

Reads every ``*.json`` the benchmark scripts wrote (``--json``) into RESULTS_DIR, prints one line
per figure (value or min/median/p99/max, the target and whether it was met) and writes the same
table, with the machine and the commands, as Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_ORDER = (
    "time_to_routable",
    "time_to_unroutable",
    "slow_starter",
    "churn",
    "scale",
    "footprint",
    "register",
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.3g}"


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    table = []
    for result in results:
        for figure in result["figures"]:
            if "value" in figure:
                shown = f"{_fmt(figure['value'])}"
            elif "median" in figure:
                shown = " / ".join(_fmt(figure[k]) for k in ("min", "median", "p99", "max"))
                shown += f" (n={figure['n']})"
            else:
                shown = "no data"
            targets = figure.get("targets", [])
            target = "; ".join(
                f"{'' if t['stat'] == 'value' else t['stat'] + ' '}{t['op']} {_fmt(t['limit'])}"
                for t in targets
            )
            verdicts = [t["met"] for t in targets]
            if not verdicts:
                verdict = ""
            elif None in verdicts:
                verdict = "no data"
            else:
                verdict = "met" if all(verdicts) else "MISSED"
            table.append([figure["name"], shown, figure["unit"], target, verdict])
        for note in result.get("notes", []):
            table.append([f"{result['benchmark']}: {note}", "", "", "", ""])
    return table


def load(folder: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and "figures" in data:
            results.append(data)
    rank = {name: index for index, name in enumerate(_ORDER)}
    results.sort(key=lambda r: rank.get(r["benchmark"], len(rank)))
    return results


def markdown(results: list[dict[str, Any]], table: list[list[str]]) -> str:
    lines = ["# Benchmark results", ""]
    if results:
        machine = results[0]["machine"]
        lines += [
            f"Date: {results[0]['date']}. Machine: {machine['cores']} cores, "
            f"{machine['memory_mib']} MiB, kernel {machine['kernel']}, Python "
            f"{machine['python']}; {machine['haproxy']}; {machine['etcd']}; {machine['dockerd']}.",
            "",
            "Figure: a single value, or min / median / p99 / max over n samples.",
            "",
        ]
    lines += ["| figure | value | unit | target | |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table]
    lines += ["", "Commands (load average when each started):", ""]
    for result in results:
        load_avg = result["machine"].get("loadavg_at_start", 0.0)
        lines.append(f"- `{result['command']}` ({load_avg:.2f})")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    results = load(args.folder)
    table = rows(results)
    widths = [max([len(row[i]) for row in table] + [0]) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    if args.markdown:
        args.markdown.write_text(markdown(results, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
