"""The adversarial table (`docs/benchmarks/adversarial.md`): every case of
`benchmarks/adversarial.py`, what was sent, and what came back before and after the fixes of
issue 31, side by side, from `adversarial_before.json` and `adversarial_after.json` (whichever
exist).

    .venv/bin/python -m benchmarks.adversarial_table
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.report import RESULTS_DIR

LABELS = ("before", "after")


def cell(row: dict[str, Any] | None) -> str:
    """One result: the status in bold, the answer, the seconds, the notes."""
    if row is None:
        return "-"
    text = f"**{row['status']}**"
    if row["answer"]:
        text += f": {row['answer']}"
    if row["seconds"] is not None:
        text += f" ({row['seconds']} s)"
    if row["notes"]:
        text += f". {row['notes']}"
    return text.replace("|", "\\|").replace("\n", " ")


def table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table of `results` (label -> a results file's content)."""
    by_label = {
        label: {row["case"]: row for row in data["rows"]} for label, data in results.items()
    }
    cases: list[str] = []
    for rows in by_label.values():
        cases += [case for case in rows if case not in cases]
    labels = [label for label in LABELS if label in results]
    lines = [
        "| # | case | sent | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for case in cases:
        first = next(rows[case] for rows in by_label.values() if case in rows)
        sent = first["sent"].replace("|", "\\|")
        cells = " | ".join(cell(by_label[label].get(case)) for label in labels)
        lines.append(f"| {first['point']} | `{case}` | {sent} | {cells} |")
    return "\n".join(lines) + "\n"


def write_table(directory: Path = RESULTS_DIR) -> Path:
    results = {
        label: json.loads(path.read_text())
        for label in LABELS
        if (path := directory / f"adversarial_{label}.json").exists()
    }
    runs = "\n".join(
        f"- **{label}**: {run['command']} Server: `{run['server']}`; {len(run['cases'])} "
        f"case(s), {run['wall_s']} s."
        for label, data in results.items()
        for run in data["runs"]
    )
    markdown = (
        "# Adversarial cases, before and after (issue 31)\n\n"
        "What was sent to `vllm serve tiny-qwen-image --task image` and what came back; "
        "produced by `python -m benchmarks.adversarial --label before|after` "
        "(`benchmarks/adversarial.py` says how). The number is the point of issue 31.\n\n"
        f"{runs}\n\n{table(results)}"
    )
    path = directory / "adversarial.md"
    path.write_text(markdown)
    return path


if __name__ == "__main__":
    print(f"wrote {write_table()}")
