"""The report's compare section (`report --compare RUN_B`): audit.diff's settings that differ,
the funnels side by side and the samples kept by one run only."""

from __future__ import annotations

from laionface.audit.diff import RunDiff
from laionface.audit.html import escape, html_table, note, setting_value


def section_compare(result: RunDiff | None) -> str:
    if result is None:
        return note("No run to compare with: laionface report RUN --compare RUN_B adds one.")
    parts = [
        f"<p>This run (A) against <code>{escape(result.run_b)}</code> (B).</p>",
        "<h3>Settings that differ</h3>",
    ]
    rows = [
        [escape(s["where"]), escape(s["key"]), setting_value(s["a"]), setting_value(s["b"])]
        for s in result.settings
    ]
    header = [("where", False), ("setting", False), ("A", False), ("B", False)]
    parts.append(html_table(header, rows, id="compare-settings-table") if rows else note("None."))
    parts.append("<h3>Funnels side by side</h3>")
    rows = []
    for row in result.funnel:
        reason = row["reason"] or f"({'in' if row['outcome'] == 'input' else row['outcome']})"
        rows.append(
            [
                escape(row["stage"]),
                escape(reason),
                f"{row['a']:,}",
                f"{row['b']:,}",
                f"{row['change']:+,}",
            ]
        )
    header = [("stage", False), ("reason", False), ("A", True), ("B", True), ("B - A", True)]
    parts.append(html_table(header, rows, id="compare-funnel-table"))
    parts.append("<h3>Samples kept by one run only</h3>")
    parts.append(_compare_keys(result))
    return "".join(parts)


def _compare_keys(result: RunDiff) -> str:
    keys = result.keys
    if keys.note:
        return note(keys.note)
    rows = []
    for side, other in (("A", "B"), ("B", "A")):
        fates = ", ".join(f"{fate} {n:,}" for fate, n in keys.by_fate[side].most_common())
        rows.append(
            [
                escape(f"kept by {side}, not by {other}"),
                f"{keys.counts[side]:,}",
                escape(fates or "-"),
                escape(", ".join(keys.examples[side]) or "-"),
            ]
        )
    header = [
        ("", False),
        ("samples", True),
        ("their fate in the other run", False),
        ("e.g.", False),
    ]
    return html_table(header, rows, id="compare-keys-table") + note(
        "All of them: laionface diff RUN_A RUN_B --out FILE.parquet"
    )
