"""The report's plots: matplotlib figures drawn on the Agg canvas and inlined as PNG data URIs."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from laionface.audit.html import escape


def plot_label(text: str) -> str:
    """Data used as a matplotlib label: no mathtext ($...$) interpretation."""
    return text.replace("$", r"\$")


def figure(width: float = 7.5, height: float = 3.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png(fig: Any, alt: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _data_range(
    series: dict[str, np.ndarray], edges: np.ndarray, marks: dict | None, log: bool
) -> tuple[float, float]:
    """The x range of the bins holding data (and the marks), with a margin: fixed bins span
    every size an image could have, the data a small part of it."""
    filled = np.flatnonzero(np.sum(list(series.values()), axis=0))
    if not len(filled):
        return float(edges[0]), float(edges[-1])
    low, high = float(edges[filled[0]]), float(edges[filled[-1] + 1])
    for x in (marks or {}).values():
        low, high = min(low, x), max(high, x)
    if log:
        return max(float(edges[0]), low / 2), min(float(edges[-1]), high * 2)
    pad = 0.05 * (float(edges[-1]) - float(edges[0]))
    return max(float(edges[0]), low - pad), min(float(edges[-1]), high + pad)


def hist_plot(
    series: dict[str, np.ndarray],
    edges: np.ndarray,
    xlabel: str,
    *,
    logx: bool = False,
    logy: bool = False,
    marks: dict[str, float] | None = None,
    alt: str,
) -> str:
    fig = figure()
    ax = fig.add_subplot()
    for label, counts in series.items():
        ax.stairs(counts, edges, label=plot_label(label), fill=len(series) == 1, alpha=0.8)
    for label, x in (marks or {}).items():
        ax.axvline(x, color="black", linestyle="--", linewidth=1, label=plot_label(label))
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("symlog", linthresh=1)
    ax.set_xlim(*_data_range(series, edges, marks, logx))
    if not logy:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if len(series) > 1 or marks:
        ax.legend(fontsize=8)
    return png(fig, alt)


def barh_plot(labels: list[str], values: list[int], xlabel: str, alt: str) -> str:
    fig = figure(7.5, max(1.6, 0.28 * len(labels) + 0.8))
    ax = fig.add_subplot()
    positions = np.arange(len(labels))
    ax.barh(positions, values, color="#d9534f")
    names = [label if len(label) <= 40 else label[:39] + "\u2026" for label in labels]
    ax.set_yticks(positions, labels=[plot_label(name) for name in names], fontsize=8)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    return png(fig, alt)


def shard_ticks(ax: Any, names: list[str], most: int = 16) -> None:
    """Shard names under at most `most` evenly spaced ticks."""
    step = max(1, -(-len(names) // most))
    positions = list(range(0, len(names), step))
    ax.set_xticks(positions, labels=[names[i] for i in positions], rotation=45, fontsize=8)
