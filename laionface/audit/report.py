"""`laionface report RUN`: one self-contained HTML file that shows what a run kept and dropped.

Everything is inline (plots as PNG data URIs drawn with matplotlib's Agg canvas, thumbnails as JPEG
data URIs), there is no script at all, and a Content-Security-Policy forbids any load but inline
images and styles, so the file opens offline and a hostile caption can't run anything. Every text
that comes from the data (captions, URLs, domains, error messages, keys) goes through
`html.escape`; URLs are shown as text, never as links.

Sections (stable ids, SECTIONS): funnel, download-failures, failures-by-domain, resolution,
faces-per-image, face-size, face-size-by-reason, scores, threshold-sweep, duplicates,
duplicate-images, shards, kept-data, kept-domains, kept-samples, dropped-samples, compare,
settings, timings (the ones on how the run was made and what it kept: sections.py). A section
whose stage has no output says so instead of being left out.

Contact sheets show random samples (chosen from `run.seed`, so the same run gives the same report)
with their detections drawn: green for faces select counts, orange for faces that score but are
too small, red for detections below `select.min_score`. To keep the reading bounded on a big run,
samples come from a few raw shards (picked at random, plus one more for each rare drop reason
the first ones lack), and only those shards' tars are read, streamed, member by member.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TextIO

import numpy as np
from matplotlib.ticker import MaxNLocator

from laionface.audit import sections
from laionface.audit.figures import (
    BOX_EDGES,
    FACE_COUNT_BINS,
    SCORE_EDGES,
    SIDE_EDGES,
    TOP_DOMAINS,
    FaceStats,
    domain_failures,
    face_stats,
)
from laionface.audit.funnel import funnel
from laionface.audit.html import absent, escape, html_table, note
from laionface.audit.model import KEPT, AuditError, ConservationError, Funnel, pct
from laionface.audit.plots import barh_plot, figure, hist_plot, png, shard_ticks
from laionface.audit.read import run_config
from laionface.audit.shards import CLUSTER_SIZE_CAP, DOMAINS_PER_SHARD, cluster_summary
from laionface.audit.sheets import (
    DROPPED_SAMPLES,
    LEGEND,
    URL_CHARS,
    Sample,
    choose_samples,
    render_samples,
    sheet,
)
from laionface.audit.stats import reason_label
from laionface.config import Config
from laionface.io import storage
from laionface.layout import RunLayout

SECTIONS = (
    ("funnel", "Funnel"),
    ("download-failures", "Download failures by category"),
    ("failures-by-domain", "Download failures by domain (top 20)"),
    ("resolution", "Image resolution"),
    ("faces-per-image", "Faces per image"),
    ("face-size", "Face box size"),
    ("face-size-by-reason", "Face box size per select decision"),
    ("scores", "Detection scores"),
    ("threshold-sweep", "Threshold sweep"),
    ("duplicates", "Duplicate clusters"),
    ("duplicate-images", "Duplicate clusters, image by image"),
    ("shards", "Samples per shard"),
    ("kept-data", "Kept data: license, NSFW, similarity, caption length"),
    ("kept-domains", "Kept data by domain (top 20)"),
    ("kept-samples", "Kept samples"),
    ("dropped-samples", "Dropped samples"),
    ("compare", "Compared with another run"),
    ("settings", "Settings and software versions"),
    ("timings", "Stage timings"),
)


@dataclass(frozen=True)
class ReportOptions:
    """`laionface report` options: images per drop reason, a run to compare with, the sweep's
    `--grid` (none: sweep.DEFAULT_GRID around the run's thresholds)."""

    samples: int = DROPPED_SAMPLES
    compare: str | None = None
    grid: tuple[str, ...] = ()


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:#c9d1e0}nav{margin-top:10px}nav a{color:#9fd0ff;margin-right:14px}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;margin:18px 0;padding:8px 20px}
h2{font-size:18px;margin:10px 0}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #e6e9ee;
text-align:left;vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.stage-in td{border-top:2px solid #c5ccd8;font-weight:600}tr.kept td{color:#137333}
.problem{background:#fdecea;border:1px solid #f5c2c0;color:#8a1c16;padding:8px 14px;
border-radius:6px}
.ok{color:#137333}.note{color:#5f6b7c}img.plot{max-width:100%;height:auto}
.sheet{display:flex;flex-wrap:wrap;gap:10px}
.card{width:232px;border:1px solid #dde1e8;border-radius:4px;padding:4px;font-size:12px;
overflow-wrap:anywhere}.card img{display:block;max-width:224px;max-height:224px;margin:auto}
.card .missing{height:120px;display:flex;align-items:center;justify-content:center;
background:#eef0f3;color:#5f6b7c;text-align:center}
.card .caption{margin:3px 0}.card code{font-size:11px;color:#3c4658}
.legend span{display:inline-block;padding:0 8px;margin-right:8px;border:2px solid}
.card.keeper{border:3px solid #137333}
"""


def _shared_ids_note(run_url: str) -> str:
    """A note when several kept metadata rows share a SAMPLE_ID (metadata/summary.json)."""
    summary_url = RunLayout(run_url).metadata_summary
    if not storage.exists(summary_url):
        return ""
    shared = storage.read_json(summary_url).get("shared_sample_ids") or {}
    if not shared.get("ids"):
        return ""
    examples = ", ".join(map(str, shared.get("examples", [])))
    return (
        f'<p id="shared-sample-ids">{shared["ids"]:,} SAMPLE_IDs are shared by {shared["rows"]:,}'
        f" kept metadata rows (e.g. {escape(examples)}): LAION's SAMPLE_ID is not a unique key."
        " Every image keeps its own key, and the exports keep every image.</p>"
    )


def _section_funnel(result: Funnel) -> str:
    parts = []
    if result.ok:
        parts.append(
            '<p class="ok">Conservation checked: every input row is kept, or dropped once for one'
            " reason.</p>"
        )
    else:
        items = "".join(f"<li>{escape(p)}</li>" for p in result.problems)
        parts.append(
            '<div class="problem"><strong>The funnel does not add up</strong>; these figures'
            f" can't be relied on until the stages named are redone:<ul>{items}</ul></div>"
        )
    rows_html = []
    for row in result.rows():
        cls = {"input": "stage-in", "kept": "kept"}.get(row["outcome"], "dropped")
        rows_html.append(
            f'<tr class="{cls}"><td>{escape(row["stage"])}</td>'
            f"<td>{escape(reason_label(row))}</td>"
            f'<td class="n">{row["count"]:,}</td>'
            f'<td class="n">{row["pct_of_input"]:.2f}%</td>'
            f'<td class="n">{row["pct_of_stage_input"]:.2f}%</td></tr>'
        )
    parts.append(
        '<table id="funnel-table"><thead><tr><th>stage</th><th>reason</th><th class="n">count'
        '</th><th class="n">% of input</th><th class="n">% of stage input</th></tr></thead>'
        f"<tbody>{''.join(rows_html)}</tbody></table>"
    )
    last = result.stages[-1].stage if result.stages else "-"
    parts.append(
        f"<p>Kept: <strong>{result.kept:,}</strong> of {result.input_rows:,} input rows"
        f" ({pct(result.kept, result.input_rows):.2f}%) after {escape(last)}.</p>"
    )
    if result.not_run:
        parts.append(note(f"Stages without output: {', '.join(result.not_run)}."))
    if result.disabled:
        parts.append(note(f"Stages turned off in the config: {', '.join(result.disabled)}."))
    parts.append(_shared_ids_note(result.run_url))
    labels = ["input"] + [f"after {s.stage}" for s in result.stages]
    values = [result.input_rows] + [s.kept for s in result.stages]
    fig = figure(7.5, 0.35 * len(labels) + 1.0)
    ax = fig.add_subplot()
    ax.barh(np.arange(len(labels)), values, color="#4a7fc1")
    ax.set_yticks(np.arange(len(labels)), labels=labels)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    parts.append(png(fig, "rows remaining after each stage"))
    return "".join(parts)


def _section_download_failures(result: Funnel) -> str:
    stage = result.stage("download")
    if stage is None:
        return absent("download")
    if not stage.dropped:
        return note(f"No download failures: all {stage.input:,} rows downloaded.")
    examples = result.download.examples if result.download is not None else {}
    rows = []
    for category, count in stage.dropped.items():
        shown = "<br>".join(
            f"<code>{escape(e['URL'], URL_CHARS)}</code>: {escape(e['error_message'], 200)}"
            for e in examples.get(category, [])
        )
        rows.append(
            [
                escape(category),
                f"{count:,}",
                f"{pct(count, stage.input):.2f}%",
                shown,
            ]
        )
    table = html_table(
        [("category", False), ("rows", True), ("% of download input", True), ("examples", False)],
        rows,
        id="download-failures-table",
    )
    plot = barh_plot(
        list(stage.dropped), list(stage.dropped.values()), "failed rows", "failures by category"
    )
    summary = (
        f"<p>{stage.dropped_total:,} of {stage.input:,} rows failed to download"
        f" ({pct(stage.dropped_total, stage.input):.2f}%); each row is counted once, under"
        " its latest attempt.</p>"
    )
    return summary + table + plot


def _section_domains(result: Funnel) -> str:
    if result.download is None:
        return absent("download")
    top = domain_failures(result.download.domains)
    if not top:
        return note("No download failures.") + _rate_limits(result.download.http_429_by_host)
    rows = [
        [escape(r["domain"]), f"{r['rows']:,}", f"{r['failed']:,}", f"{100 * r['rate']:.1f}%"]
        for r in top
    ]
    table = html_table(
        [("domain", False), ("rows", True), ("failed", True), ("failure rate", True)],
        rows,
        id="domains-table",
    )
    plot = barh_plot(
        [r["domain"] for r in top], [r["failed"] for r in top], "failed rows", "failures by domain"
    )
    scope = note(
        f"Each metadata shard reports its {DOMAINS_PER_SHARD} domains with the most failures;"
        " the counts are their sums, exact for a domain in the lists of all its shards."
    )
    return table + plot + scope + _rate_limits(result.download.http_429_by_host)


def _rate_limits(by_host: dict[str, int]) -> str:
    """The hosts that answered 429 Too Many Requests, most first (download.max_per_host and
    Retry-After are the stage's answer to them)."""
    if not by_host:
        return note("No host answered 429 Too Many Requests.")
    rows = [[escape(host), f"{n:,}"] for host, n in list(by_host.items())[:TOP_DOMAINS]]
    return (
        "<h3>429 Too Many Requests, by host</h3>"
        + html_table([("host", False), ("429 answers", True)], rows, id="rate-limits-table")
        + note(
            f"{sum(by_host.values()):,} answers 429 from {len(by_host):,} host(s); each was"
            " retried after its Retry-After (download.rate_limit_retries,"
            " download.max_retry_after), and fewer requests at once go to a host with a"
            " lower download.max_per_host."
        )
    )


def _section_resolution(stats: FaceStats | None, config: Config) -> str:
    if stats is None:
        return absent("faces")
    marks = (
        {"select.min_image_side": config.select.min_image_side}
        if config.select.min_image_side
        else {}
    )
    plot = hist_plot(
        {"shorter side": stats.min_side, "longer side": stats.max_side},
        SIDE_EDGES,
        "pixels (upright image)",
        logx=True,
        marks=marks,
        alt="image sides",
    )
    return (
        f"<p>{stats.decoded:,} of {stats.images:,} downloaded images decoded"
        f" ({stats.images - stats.decoded:,} could not be).</p>" + plot
    )


def _section_faces_per_image(stats: FaceStats | None, config: Config) -> str:
    if stats is None:
        return absent("faces")
    labels = [str(i) for i in range(FACE_COUNT_BINS)] + [f"{FACE_COUNT_BINS}+"]
    fig = figure()
    ax = fig.add_subplot()
    positions = np.arange(len(labels))
    ax.bar(positions - 0.2, stats.faces_all, 0.4, label="recorded detections")
    ax.bar(positions + 0.2, stats.faces_scoring, 0.4, label=f"score >= {config.select.min_score}")
    ax.set_xticks(positions, labels=labels)
    ax.set_xlabel("faces in the image")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    rows = [
        [label, f"{int(a):,}", f"{int(b):,}"]
        for label, a, b in zip(labels, stats.faces_all, stats.faces_scoring, strict=True)
        if a or b
    ]
    table = html_table(
        [
            ("faces", False),
            ("images (detections)", True),
            (f"images (score >= {config.select.min_score})", True),
        ],
        rows,
        id="faces-per-image-table",
    )
    return png(fig, "faces per image") + table


def _section_face_size(stats: FaceStats | None, config: Config) -> str:
    if stats is None:
        return absent("faces")
    plot = hist_plot(
        {
            f"score >= {config.select.min_score}": stats.box_scoring,
            f"score < {config.select.min_score}": stats.box_low,
        },
        BOX_EDGES,
        "shorter side of the face box, pixels (log scale)",
        logx=True,
        marks={"select.min_face_size": config.select.min_face_size}
        if config.select.min_face_size
        else {},
        alt="face box sizes",
    )
    return f"<p>{stats.detections:,} recorded detections.</p>" + plot


def _section_scores(stats: FaceStats | None, config: Config) -> str:
    if stats is None:
        return absent("faces")
    return hist_plot(
        {"detections": stats.scores},
        SCORE_EDGES,
        "detection score",
        logy=True,
        marks={"select.min_score": config.select.min_score},
        alt="detection scores",
    )


def _section_duplicates(run_url: str, result: Funnel) -> str:
    stage = result.stage("dedup")
    if stage is None:
        return absent("dedup")
    summary = cluster_summary(url=RunLayout(run_url).dedup_decisions)
    counts = [
        [escape(reason), f"{n:,}", f"{pct(n, stage.input):.2f}%"]
        for reason, n in stage.dropped.items()
    ]
    parts = [
        f"<p>{stage.dropped_total:,} of {stage.input:,} selected images dropped as duplicates;"
        f" {summary['clusters']:,} clusters with more than one image.</p>",
        html_table(
            [("reason", False), ("images", True), ("% of dedup input", True)],
            counts,
            id="duplicates-table",
        ),
    ]
    if summary["clusters"]:
        parts.append(_cluster_size_plot(summary["histogram"]))
        rows = [
            [str(c["cluster"]), f"{c['images']:,}", escape(c["keeper"])] for c in summary["largest"]
        ]
        parts.append("<h3>Largest clusters</h3>")
        parts.append(html_table([("cluster", True), ("images", True), ("kept key", False)], rows))
    return "".join(parts)


def _cluster_size_plot(histogram: list[int]) -> str:
    bins = np.array(histogram)
    labels = [str(i) for i in range(2, CLUSTER_SIZE_CAP)] + [f"{CLUSTER_SIZE_CAP}+"]
    fig = figure()
    ax = fig.add_subplot()
    ax.bar(np.arange(len(labels)), bins, color="#8e6cc1")
    ax.set_xticks(np.arange(len(labels)), labels=labels)
    if bins.max() > 50:  # web data: many pairs, a few huge clusters
        ax.set_yscale("symlog", linthresh=1)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("images in the cluster")
    ax.set_ylabel("clusters")
    return png(fig, "duplicate cluster sizes")


def _raw_shard_plot(series: dict[str, dict[str, int]]) -> str:
    shards = sorted({s for per_shard in series.values() for s in per_shard})
    fig = figure()
    ax = fig.add_subplot()
    x = np.arange(len(shards))
    for label, per_shard in series.items():
        ax.plot(
            x,
            [per_shard.get(s, 0) for s in shards],
            marker="o" if len(shards) <= 60 else None,
            label=label,
        )
    shard_ticks(ax, shards)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("raw shard")
    ax.set_ylabel("images")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return "<h3>Per raw shard</h3>" + png(fig, "images per raw shard")


def _dataset_shards_part(sizes: dict[str, int]) -> str:
    values = np.array(list(sizes.values()) or [0])
    parts = [
        "<h3>Per dataset shard</h3>",
        f"<p>{len(sizes):,} dataset shards, {int(values.sum()):,} samples:"
        f" min {int(values.min()):,}, median {int(np.median(values)):,},"
        f" max {int(values.max()):,} per shard.</p>",
    ]
    fig = figure()
    ax = fig.add_subplot()
    ax.bar(np.arange(len(sizes)), list(sizes.values()), color="#4a7fc1")
    shard_ticks(ax, list(sizes))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("dataset shard")
    ax.set_ylabel("samples")
    parts.append(png(fig, "samples per dataset shard"))
    if len(sizes) <= 100:
        parts.append(
            html_table(
                [("shard", False), ("samples", True)],
                [[escape(s), f"{n:,}"] for s, n in sizes.items()],
                id="dataset-shards-table",
            )
        )
    return "".join(parts)


def _section_shards(result: Funnel) -> str:
    series: dict[str, dict[str, int]] = {}
    for name, label in (
        ("faces", "downloaded"),
        ("select", "kept by select"),
        ("dedup", "kept by dedup"),
        ("emit", "published"),
    ):
        stage = result.stage(name)
        if stage is not None:
            series[label] = {s: n for s, o, _, n in stage.shard_rows if o == KEPT}
    dataset = result.tables.get("dataset_shards")
    if not series and dataset is None:
        return absent("download")
    parts = [_raw_shard_plot(series)] if series else []
    if dataset is None:
        return "".join(parts) + absent("emit")
    sizes = dict(zip(dataset["shard"].to_pylist(), dataset["samples"].to_pylist(), strict=True))
    return "".join(parts) + _dataset_shards_part(sizes)


def _section_kept(samples: list[Sample], result: Funnel) -> str:
    kept = [s for s in samples if s.category == "kept"]
    if not kept:
        return absent("select") if result.stage("select") is None else note("No kept samples.")
    last = "dedup" if result.stage("dedup") else "select"
    return f"<p>{len(kept)} random samples kept after {last}.</p>" + LEGEND + sheet(kept)


def _anchor(reason: str) -> str:
    return "dropped-" + re.sub(r"[^a-z0-9_-]+", "-", reason.lower())


def _section_dropped(samples: list[Sample], result: Funnel) -> str:
    if result.stage("select") is None:
        return absent("select")
    parts = [
        "<p>For each reason select or dedup dropped images for, a random sample, to spot false"
        " drops and false keeps (download failures have no image: see the failure examples).</p>",
        LEGEND,
    ]
    dropped = [s for s in samples if s.category != "kept"]
    reasons = []
    for name in ("select", "dedup"):
        stage = result.stage(name)
        if stage is not None:
            reasons += [(name, reason, n) for reason, n in stage.dropped.items()]
    if not reasons:
        parts.append(note("Nothing was dropped by select or dedup."))
    for stage_name, reason, count in reasons:
        mine = [s for s in dropped if s.category == reason]
        parts.append(
            f'<h3 id="{_anchor(reason)}">{escape(stage_name)}: {escape(reason)}'
            f" ({count:,} images, {len(mine)} shown)</h3>"
        )
        parts.append(sheet(mine))
    return "".join(parts)


def run_settings(run_url: str) -> Config:
    """The run's config as far as the report uses it ([run], [faces], [select]); the other
    sections are left at their defaults (run.json writes inf as null, which they don't accept)."""
    data = run_config(run_url)
    return Config.model_validate({k: data[k] for k in ("run", "faces", "select") if k in data})


def _bodies(run_url: str, result: Funnel, config: Config, samples: list[Sample]) -> dict:
    stats = face_stats(run_url, config.select.min_score) if result.stage("faces") else None
    return {
        "funnel": _section_funnel(result),
        "download-failures": _section_download_failures(result),
        "failures-by-domain": _section_domains(result),
        "resolution": _section_resolution(stats, config),
        "faces-per-image": _section_faces_per_image(stats, config),
        "face-size": _section_face_size(stats, config),
        "scores": _section_scores(stats, config),
        "duplicates": _section_duplicates(run_url, result),
        "shards": _section_shards(result),
        "kept-samples": _section_kept(samples, result),
        "dropped-samples": _section_dropped(samples, result),
    }


def build_report(
    run_url: str, result: Funnel | None = None, options: ReportOptions = ReportOptions()
) -> str:
    """The report of the run at `run_url`, as one HTML document (`result`: its funnel, when
    already computed)."""
    result = result or funnel(run_url)
    config = run_settings(run_url)
    samples = (
        choose_samples(run_url, result, config.run.seed, options.samples)
        if result.stage("select")
        else []
    )
    render_samples(run_url, samples, config)
    bodies = {
        **_bodies(run_url, result, config, samples),
        **sections.bodies(run_url, result, config, compare=options.compare, grid=options.grid),
    }
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title in SECTIONS)
    sections_html = "".join(
        f'<section id="{sid}"><h2>{escape(title)}</h2>{bodies[sid]}</section>'
        for sid, title in SECTIONS
    )
    run_json = RunLayout(run_url).run_json
    created = storage.read_json(run_json).get("created", "") if storage.exists(run_json) else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';'
        " img-src data:; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>laionface report: {escape(config.run.name)}</title><style>{CSS}</style></head>"
        f"<body><header><h1>laionface report: {escape(config.run.name)}</h1>"
        f"<p>run folder <code>{escape(run_url)}</code>"
        f"{' · created ' + escape(created) if created else ''} · seed {config.run.seed}</p>"
        f"<nav>{nav}</nav></header><main>{sections_html}</main></body></html>\n"
    )


def write_report(
    run_url: str,
    out: str | None = None,
    result: Funnel | None = None,
    options: ReportOptions = ReportOptions(),
) -> str:
    """Write the report (default `RUN/audit/report.html`) atomically; returns where it went."""
    out = out or RunLayout(run_url).report
    storage.write_bytes(out, build_report(run_url, result, options).encode("utf-8"))
    return out


def report_command(
    run_url: str,
    out: str | None = None,
    stream: TextIO | None = None,
    samples: int | None = None,
    compare: str | None = None,
    grid: list[str] | tuple[str, ...] = (),
) -> int:
    """`laionface report RUN [--out FILE] [--samples N] [--compare RUN_B] [--grid ...]`: 0 when
    written from a funnel that adds up, else 1 (the report is written all the same, with the
    problems at the top)."""
    stream = stream or sys.stdout
    samples = DROPPED_SAMPLES if samples is None else samples
    if samples < 0:
        print(f"error: --samples {samples}: give 0 or more images per reason", file=sys.stderr)
        return 2
    options = ReportOptions(samples, compare, tuple(grid))
    try:
        result = funnel(run_url)
        path = write_report(run_url, out, result, options)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}", file=stream)
    if not result.ok:
        print(f"error: {ConservationError(result.problems)}", file=sys.stderr)
        return 1
    return 0
