"""The report's sections on how a run was made and what it kept (report.py has the funnel, the
failures, the detections and the contact sheets):

settings (each stage's settings and software versions), timings (each step, and its shards from
the completion markers), kept-data (license, NSFW tag, similarity, caption length: kept against
the download input), kept-domains (top 20 with the kept rate), face-size-by-reason (the
detections of the images select dropped, per reason), duplicate-images (each of the largest
near-duplicate clusters, its keeper beside the images dropped), with threshold-sweep
(sweep_section.py) and compare (compare_section.py).

Every text from the data goes through `html.escape`, as in report.py.
"""

from __future__ import annotations

import numpy as np

from laionface.audit.breakdown import (
    CAPTION_EDGES,
    SIMILARITY_EDGES,
    KeptData,
    face_sizes_by_reason,
    kept_data,
)
from laionface.audit.clusters import ClusterSheet, cluster_sheets
from laionface.audit.compare_section import section_compare
from laionface.audit.diff import RunDiff, diff, flatten
from laionface.audit.figures import BOX_EDGES
from laionface.audit.html import absent, escape, html_table, note, setting_value
from laionface.audit.model import Funnel, pct
from laionface.audit.plots import barh_plot, hist_plot
from laionface.audit.provenance import Provenance, provenance
from laionface.audit.sheets import LEGEND, render_samples, sheet
from laionface.audit.sweep_section import section_sweep, sweep_or_why
from laionface.config import Config

LICENSES_SHOWN = 12


def section_settings(record: Provenance | None) -> str:
    if record is None:
        return note("No run.json in this folder: the settings and versions are not recorded.")
    parts = [f"<p>Run folder created {escape(record.created)}.</p>"] if record.created else []
    rows = []
    for name, stage in record.stages.items():
        for key, value in flatten(stage.get("settings") or {}).items():
            rows.append([escape(name), escape(key), setting_value(value)])
    parts.append("<h3>Settings each stage last ran with</h3>")
    parts.append(
        html_table(
            [("stage", False), ("setting", False), ("value", False)], rows, id="settings-table"
        )
        if rows
        else note("No stage has recorded its settings.")
    )
    parts.append("<h3>Software versions</h3>")
    parts.append(_versions(record))
    return "".join(parts)


def _versions(record: Provenance) -> str:
    names = sorted(
        {*record.versions, *(n for s in record.stages.values() for n in s.get("versions", {}))}
    )
    rows = []
    for name in names:
        other = [
            f"{stage} ({s['versions'][name]})"
            for stage, s in record.stages.items()
            if s.get("versions", {}).get(name) not in (None, record.versions.get(name))
        ]
        rows.append(
            [escape(name), escape(record.versions.get(name, "-")), escape(", ".join(other) or "-")]
        )
    header = [
        ("software", False),
        ("last command", False),
        ("stages run with another version", False),
    ]
    return html_table(header, rows, id="versions-table")


def section_timings(record: Provenance | None) -> str:
    if record is None or not record.timings:
        return note("No stage timings recorded (run.json).")
    rows = []
    for t in record.timings:
        per = t.shard_seconds or {}
        rows.append(
            [
                escape(t.step),
                escape(t.status),
                escape(t.started),
                escape(t.finished),
                f"{t.seconds:,.1f}" if isinstance(t.seconds, int | float) else "-",
                escape(t.shards),
                f"{per['median']:,.2f}" if per else "-",
                f"{per['max']:,.2f}" if per else "-",
                escape(per.get("slowest", "-")),
            ]
        )
    header = [
        ("stage or step", False),
        ("status", False),
        ("started", False),
        ("finished", False),
        ("seconds", True),
        ("shards", False),
        ("median s per shard", True),
        ("max s per shard", True),
        ("slowest shard", False),
    ]
    stages = [t for t in record.timings if "/" not in t.step and isinstance(t.seconds, int | float)]
    plot = (
        barh_plot(
            [t.step for t in stages], [t.seconds for t in stages], "seconds", "seconds per stage"
        )
        if stages
        else ""
    )
    return (
        html_table(header, rows, id="timings-table")
        + note("Per shard: the seconds each shard's completion marker records (STEP/_done/).")
        + plot
    )


def _share_table(title: str, kept: dict[str, int], given: dict[str, int], table_id: str) -> str:
    names = sorted(set(kept) | set(given), key=lambda n: (-kept.get(n, 0), -given.get(n, 0), n))
    shown, rest = names[:LICENSES_SHOWN], names[LICENSES_SHOWN:]
    rows = []
    for name in shown:
        k, g = kept.get(name, 0), given.get(name, 0)
        rows.append([escape(name, 120), f"{k:,}", f"{g:,}", f"{pct(k, g):.1f}%" if g else "-"])
    if rest:
        k, g = sum(kept.get(n, 0) for n in rest), sum(given.get(n, 0) for n in rest)
        rows.append([escape(f"({len(rest)} others)"), f"{k:,}", f"{g:,}", f"{pct(k, g):.1f}%"])
    header = [(title, False), ("kept", True), ("download input", True), ("kept rate", True)]
    return html_table(header, rows, id=table_id)


def section_kept_data(data: KeptData | None) -> str:
    if data is None:
        return absent("emit")
    kept, given = data.kept, data.input
    parts = [
        f"<p>{kept.rows:,} published samples against the {given.rows:,} rows given to the"
        " download (metadata/shards/).</p>",
        "<h3>By license</h3>",
        _share_table("license", kept.license, given.license, "license-table"),
        "<h3>By NSFW tag</h3>",
        _share_table("NSFW", kept.nsfw, given.nsfw, "nsfw-table"),
        "<h3>CLIP image-text similarity</h3>",
        hist_plot(
            {"download input": given.similarity, "kept": kept.similarity},
            SIMILARITY_EDGES,
            "similarity",
            alt="similarity of kept and input rows",
        ),
        "<h3>Caption length</h3>",
        hist_plot(
            {"download input": given.caption, "kept": kept.caption},
            CAPTION_EDGES,
            "characters (log scale)",
            logx=True,
            alt="caption length of kept and input rows",
        ),
    ]
    return "".join(parts)


def section_kept_domains(data: KeptData | None) -> str:
    if data is None:
        return absent("emit")
    if not data.domains:
        return note("No published samples.")
    rows = [
        [escape(d["domain"]), f"{d['kept']:,}", f"{d['rows']:,}", f"{100 * d['rate']:.1f}%"]
        for d in data.domains
    ]
    header = [("domain", False), ("kept", True), ("download input rows", True), ("kept rate", True)]
    plot = barh_plot(
        [d["domain"] for d in data.domains],
        [d["kept"] for d in data.domains],
        "kept samples",
        "kept samples by domain",
    )
    scope = note(
        "The domains are chosen from each dataset shard's domains with the most samples; the"
        " counts of those shown are exact."
    )
    return html_table(header, rows, id="kept-domains-table") + plot + scope


def section_face_size_by_reason(sizes: dict[str, dict] | None, min_face_size: int) -> str:
    if sizes is None:
        return absent("select")
    label = {"": "kept by select"}
    series = {label.get(r, r): np.asarray(v["sides"]) for r, v in sizes.items() if v["detections"]}
    rows = [
        [escape(label.get(r, r)), f"{v['images']:,}", f"{v['detections']:,}"]
        for r, v in sorted(sizes.items(), key=lambda item: (item[0] != "", item[0]))
    ]
    header = [("select's decision", False), ("images", True), ("recorded detections", True)]
    parts = [html_table(header, rows, id="face-size-by-reason-table")]
    if series:
        parts.append(
            hist_plot(
                series,
                BOX_EDGES,
                "shorter side of the face box, pixels (log scale)",
                logx=True,
                marks={"select.min_face_size": min_face_size} if min_face_size else {},
                alt="face box sizes per select decision",
            )
        )
    return "".join(parts)


def section_duplicate_images(clusters: list[ClusterSheet] | None) -> str:
    if clusters is None:
        return absent("dedup")
    if not clusters:
        return note("No cluster of more than one image.")
    parts = [
        "<p>The largest clusters: the image dedup kept (green frame) first, then the images it"
        " dropped as its duplicates.</p>",
        LEGEND,
    ]
    for cluster in clusters:
        dropped = len(cluster.samples) - 1
        parts.append(
            f'<h3 id="cluster-{cluster.cluster}">cluster {cluster.cluster}: {cluster.images:,}'
            f" images ({dropped} dropped shown)</h3>"
        )
        parts.append(sheet(cluster.samples))
    return "".join(parts)


def bodies(
    run_url: str, result: Funnel, config: Config, compare: str | None, grid: tuple[str, ...]
) -> dict[str, str]:
    """{section id: HTML} of this module's sections (`compare`: the run to compare with,
    `grid`: the sweep's --grid options)."""
    clusters = cluster_sheets(run_url) if result.stage("dedup") else None
    render_samples(run_url, [s for c in clusters or [] for s in c.samples], config)
    data = kept_data(run_url) if result.stage("emit") else None
    compared: RunDiff | None = diff(run_url, compare) if compare else None
    record = provenance(run_url)
    return {
        "face-size-by-reason": section_face_size_by_reason(
            face_sizes_by_reason(run_url), config.select.min_face_size
        ),
        "threshold-sweep": section_sweep(*sweep_or_why(run_url, result, grid)),
        "duplicate-images": section_duplicate_images(clusters),
        "kept-data": section_kept_data(data),
        "kept-domains": section_kept_domains(data),
        "compare": section_compare(compared),
        "settings": section_settings(record),
        "timings": section_timings(record),
    }
