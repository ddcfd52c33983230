"""The report's threshold-sweep section: audit.sweep as heat maps (kept after dedup, or after
select where the run has no dedup decisions) and a table, the run's own thresholds marked."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from laionface.audit.html import escape, html_table, note
from laionface.audit.model import AuditError, Funnel
from laionface.audit.plots import figure, plot_label, png
from laionface.audit.sweep import MISSING, Sweep, SweepPoint, notes, sweep

SWEEP_PANELS = 6  # heat maps drawn for a grid of three keys or more (one per other values)


def _cell(point: SweepPoint, state: str) -> tuple[float, str]:
    """(the value coloured, its text): after dedup where known, its bound (<=) where not."""
    if state == MISSING:
        return point.select_kept, f"{point.select_kept:,}"
    if point.dedup_kept is not None:
        return point.dedup_kept, f"{point.dedup_kept:,}"
    return point.dedup_kept_at_most or 0, f"\u2264{point.dedup_kept_at_most:,}"


def _grid_value(value: Any) -> str:
    return "none" if value is None else str(value)


def _heat_panel(ax: Any, result: Sweep, fixed: tuple, scale: tuple[float, float]) -> None:
    values = result.grid.values
    columns = values[1] if len(values) > 1 else (None,)
    by = {tuple(p.settings.values()): p for p in result.points}
    grid = np.zeros((len(values[0]), len(columns)))
    for (r, row), (c, col) in itertools.product(enumerate(values[0]), enumerate(columns)):
        point = by[(row, col, *fixed) if len(values) > 1 else (row,)]
        grid[r, c], text = _cell(point, result.dedup)
        dark = grid[r, c] < (scale[0] + scale[1]) / 2
        ax.text(
            c,
            r,
            text,
            ha="center",
            va="center",
            fontsize=8,
            color="white" if dark else "black",
            fontweight="bold" if point.is_run else "normal",
        )
    ax.imshow(grid, cmap="viridis", aspect="auto", vmin=scale[0], vmax=scale[1])
    keys = result.grid.keys
    ax.set_yticks(range(len(values[0])), labels=[plot_label(_grid_value(v)) for v in values[0]])
    ax.set_ylabel(f"select.{keys[0]}")
    if len(values) > 1:
        ax.set_xticks(range(len(columns)), labels=[plot_label(_grid_value(v)) for v in columns])
        ax.set_xlabel(f"select.{keys[1]}")
    else:
        ax.set_xticks([])
    ax.set_title(
        plot_label(
            ", ".join(f"{k}={_grid_value(v)}" for k, v in zip(keys[2:], fixed, strict=True))
        ),
        fontsize=9,
    )


def _heat_map(result: Sweep) -> str:
    panels = list(itertools.product(*result.grid.values[2:]))[:SWEEP_PANELS]
    cells = [_cell(p, result.dedup)[0] for p in result.points]
    scale = (float(min(cells)), float(max(cells)) or 1.0)
    rows = len(result.grid.values[0])
    fig = figure(min(12.0, 1.5 + 3.6 * len(panels)), 1.4 + 0.42 * rows)
    for i, fixed in enumerate(panels):
        _heat_panel(fig.add_subplot(1, len(panels), i + 1), result, fixed, scale)
    return png(fig, "images kept at each grid point")


def _sweep_table(result: Sweep) -> str:
    header = [(f"select.{k}", True) for k in result.grid.keys]
    header += [
        ("select kept", True),
        ("faces", True),
        ("after dedup", True),
        ("faces", True),
        ("", False),
    ]
    rows = []
    for p in result.points:
        after = "-" if result.dedup == MISSING else _cell(p, result.dedup)[1]
        faces = f"{p.dedup_faces:,}" if p.dedup_faces is not None else "?"
        cells = [escape(_grid_value(v)) for v in p.settings.values()]
        cells += [
            f"{p.select_kept:,}",
            f"{p.select_faces:,}",
            after,
            faces if after != "-" else "-",
        ]
        rows.append(cells + ["the run's" if p.is_run else ""])
    return html_table(header, rows, id="sweep-table")


def section_sweep(result: Sweep | None, error: str) -> str:
    if result is None:
        return note(error or "No sweep.")
    what = "after dedup" if result.dedup != MISSING else "by select"
    parts = [
        f"<p>Images kept {what} at each combination of thresholds, from the recorded detections"
        " (laionface sweep RUN --grid ...; the run's own thresholds in bold). Counted faces,"
        " drop reasons and more: the table and <code>laionface sweep --json</code>.</p>",
        _heat_map(result),
        _sweep_table(result),
    ]
    parts += [note(line) for line in notes(result)]
    return "".join(parts)


def sweep_or_why(run_url: str, result: Funnel, grid: tuple[str, ...]) -> tuple[Sweep | None, str]:
    """The threshold sweep, or (None, why there is none)."""
    if result.stage("faces") is None:
        return None, "No data: the faces stage has no output in this run folder."
    try:
        return sweep(run_url, list(grid)), ""
    except AuditError as exc:
        return None, f"No sweep: {exc}"
