"""Markdown rows of the fault suite's figures, for docs/reliability.md.

    DISCOVERD_FAULTS_REPORT=/tmp/faults/agent.json python -m pytest tests/faults/test_agent.py
    python -m tests.faults.report /tmp/faults/*.json

One row per scenario: failed requests per client (``service@host failed/total``), when the
registry and each proxy matched reality again, the scenario's other figures, the test's outcome
and the date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

_SHOWN = ("scenario", "date", "failed", "converged", "reference", "agents", "test", "outcome")


def row(entry: dict[str, Any]) -> str:
    failed = ", ".join(f"{name} {f}/{n}" for name, (f, n) in entry["failed"].items()) or "-"
    times = entry.get("converged") or {}
    converged = (
        ", ".join(f"{part} {'never' if t is None else f'{t:.2f} s'}" for part, t in times.items())
        or "-"
    )
    others = "; ".join(f"{k}: {v}" for k, v in entry.items() if k not in _SHOWN) or "-"
    outcome = entry.get("outcome") or "?"
    verdict = "**failed**" if outcome == "failed" else outcome
    cells = [entry["scenario"], failed, converged, others, verdict, entry["date"][:16]]
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def main(paths: list[str]) -> int:
    columns = ("scenario", "failed requests", "matched reality after", "other figures", "test")
    print("| " + " | ".join(columns) + " | date (UTC) |")
    print("|" + " --- |" * (len(columns) + 1))
    for path in paths:
        document = json.loads(Path(path).read_text())
        for entry in document.get("results", []):
            print(row(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
