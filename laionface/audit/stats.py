"""`laionface stats RUN`: the funnel as a table, and whether it adds up."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from laionface.audit.funnel import funnel
from laionface.audit.model import DROPPED, KEPT, AuditError, ConservationError, Funnel, pct


def reason_label(row: dict[str, Any]) -> str:
    """The reason column as printed: the drop reason, or (in) / (kept) for a stage's totals."""
    if row["outcome"] == DROPPED:
        return row["reason"]
    return "(kept)" if row["outcome"] == KEPT else "(in)"


def format_table(result: Funnel) -> str:
    """The funnel as plain text, aligned columns (what `laionface stats` prints)."""
    header = ("stage", "reason", "count", "% of input", "% of stage input")
    lines = [header]
    for row in result.rows():
        lines.append(
            (
                row["stage"],
                reason_label(row),
                f"{row['count']:,}",
                f"{row['pct_of_input']:.2f}%",
                f"{row['pct_of_stage_input']:.2f}%",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for line in lines:
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(line[2:], widths[2:], strict=True)]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text)


def stats_json(result: Funnel) -> dict[str, Any]:
    """`laionface stats --json`: the funnel's totals per stage (Funnel.as_dict), the run, and the
    table's rows (stage, outcome, reason, count, pct_of_input, pct_of_stage_input)."""
    return {"run": result.run_url, **result.as_dict(), "rows": result.rows()}


def stats_command(run_url: str, out: TextIO | None = None, as_json: bool = False) -> int:
    """`laionface stats RUN`: print the funnel (as one JSON object with `as_json`); 0 if it adds
    up, else 1 (the error printed)."""
    out = out or sys.stdout
    try:
        result = funnel(run_url)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(stats_json(result), indent=2), file=out)
        if not result.ok:
            print(f"error: {ConservationError(result.problems)}", file=sys.stderr)
        return 0 if result.ok else 1
    print(f"run: {result.run_url}", file=out)
    print(format_table(result), file=out)
    print(
        f"kept: {result.kept:,} of {result.input_rows:,} input rows"
        f" ({pct(result.kept, result.input_rows):.2f}%) after {result.stages[-1].stage}",
        file=out,
    )
    if result.not_run:
        print(f"stages without output: {', '.join(result.not_run)}", file=out)
    if result.disabled:
        print(f"stages turned off in the config: {', '.join(result.disabled)}", file=out)
    if not result.ok:
        print(f"error: {ConservationError(result.problems)}", file=sys.stderr)
        return 1
    print("conservation: ok (every input row is kept, or dropped once for one reason)", file=out)
    return 0
