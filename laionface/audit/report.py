"""`laionface report RUN`: one self-contained HTML file that shows what a run kept and dropped.

Everything is inline (plots as PNG data URIs drawn with matplotlib's Agg canvas, thumbnails as JPEG
data URIs), there is no script at all, and a Content-Security-Policy forbids any load but inline
images and styles, so the file opens offline and a hostile caption can't run anything. Every text
that comes from the data (captions, URLs, domains, error messages, keys) goes through
`html.escape`; URLs are shown as text, never as links.

Sections (stable ids): funnel, download-failures, failures-by-domain, resolution, faces-per-image,
face-size, scores, duplicates, shards, kept-samples, dropped-samples. A section whose stage has no
output says so instead of being left out.

Contact sheets show random samples (chosen from `run.seed`, so the same run gives the same report)
with their detections drawn: green for faces select counts, orange for faces that score but are
too small, red for detections below `select.min_score`. To keep the reading bounded on a big run,
samples come from a few raw shards (picked at random, plus one more for each rare drop reason
the first ones lack), and only those shards' tars are read, streamed, member by member.
"""

from __future__ import annotations

import base64
import html
import io
import posixpath
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

from laionface.audit import funnel as audit
from laionface.config import Config
from laionface.io import storage, tars
from laionface.io.imagedecode import decode_image

SECTIONS = (
    ("funnel", "Funnel"),
    ("download-failures", "Download failures by category"),
    ("failures-by-domain", "Download failures by domain (top 20)"),
    ("resolution", "Image resolution"),
    ("faces-per-image", "Faces per image"),
    ("face-size", "Face box size"),
    ("scores", "Detection scores"),
    ("duplicates", "Duplicate clusters"),
    ("shards", "Samples per shard"),
    ("kept-samples", "Kept samples"),
    ("dropped-samples", "Dropped samples"),
)
TOP_DOMAINS = 20
KEPT_SAMPLES = 24
DROPPED_SAMPLES = 8  # per drop reason
# Raw shards read for thumbnails: this many at random, up to the maximum to cover rare reasons.
SAMPLE_SHARDS = 4
MAX_SAMPLE_SHARDS = 12
THUMB_SIDE = 224
# As the faces stage reads them (not imported from it: that would load torch).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
CAPTION_CHARS = 300
URL_CHARS = 200
FACE_COUNT_BINS = 16  # 0..15 faces, then "16+"
SIDE_EDGES = np.geomspace(1, 2**16, 65)
BOX_EDGES = np.geomspace(1, 2**13, 53)
SCORE_EDGES = np.linspace(0.0, 1.0, 101)
_HOST = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]/]*\]|[^:/?#]*)"
GREEN, ORANGE, RED = (0, 200, 70), (255, 150, 0), (230, 30, 30)

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
"""


def _escape(text: Any, limit: int | None = None) -> str:
    """Data as HTML text: truncated (before escaping, so no entity is cut), then escaped."""
    text = "" if text is None else str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return html.escape(text, quote=True)


def _plot_label(text: str) -> str:
    """Data used as a matplotlib label: no mathtext ($...$) interpretation."""
    return text.replace("$", r"\$")


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(width: float = 7.5, height: float = 3.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any, alt: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{_escape(alt)}" src="data:image/png;base64,{data}">'


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


def _hist_plot(
    series: dict[str, np.ndarray],
    edges: np.ndarray,
    xlabel: str,
    *,
    logx: bool = False,
    logy: bool = False,
    marks: dict[str, float] | None = None,
    alt: str,
) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    for label, counts in series.items():
        ax.stairs(counts, edges, label=_plot_label(label), fill=len(series) == 1, alpha=0.8)
    for label, x in (marks or {}).items():
        ax.axvline(x, color="black", linestyle="--", linewidth=1, label=_plot_label(label))
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
    return _png(fig, alt)


def _barh_plot(labels: list[str], values: list[int], xlabel: str, alt: str) -> str:
    fig = _figure(7.5, max(1.6, 0.28 * len(labels) + 0.8))
    ax = fig.add_subplot()
    positions = np.arange(len(labels))
    ax.barh(positions, values, color="#d9534f")
    names = [label if len(label) <= 40 else label[:39] + "\u2026" for label in labels]
    ax.set_yticks(positions, labels=[_plot_label(name) for name in names], fontsize=8)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    return _png(fig, alt)


# ---------------------------------------------------------------------------------------------
# Figures read from the stage outputs


@dataclass
class FaceStats:
    """Histograms over every image of faces/*.parquet (accumulated shard by shard)."""

    images: int = 0
    decoded: int = 0
    detections: int = 0
    min_side: np.ndarray = field(default_factory=lambda: np.zeros(len(SIDE_EDGES) - 1, np.int64))
    max_side: np.ndarray = field(default_factory=lambda: np.zeros(len(SIDE_EDGES) - 1, np.int64))
    faces_all: np.ndarray = field(default_factory=lambda: np.zeros(FACE_COUNT_BINS + 1, np.int64))
    faces_scoring: np.ndarray = field(
        default_factory=lambda: np.zeros(FACE_COUNT_BINS + 1, np.int64)
    )
    box_scoring: np.ndarray = field(default_factory=lambda: np.zeros(len(BOX_EDGES) - 1, np.int64))
    box_low: np.ndarray = field(default_factory=lambda: np.zeros(len(BOX_EDGES) - 1, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_EDGES) - 1, np.int64))

    def merge(self, other: FaceStats) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


def _clipped_hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]


def _face_stats(url: str, min_score: float) -> FaceStats:
    table = audit.read_columns(url, ["width", "height", "decode_error", "faces"])
    stats = FaceStats(images=table.num_rows)
    ok = pc.is_null(table["decode_error"]).to_numpy(zero_copy_only=False)
    width = table["width"].to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    height = table["height"].to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    stats.decoded = int(ok.sum())
    stats.min_side = _clipped_hist(np.minimum(width, height), SIDE_EDGES)
    stats.max_side = _clipped_hist(np.maximum(width, height), SIDE_EDGES)

    faces = table["faces"].combine_chunks()
    counts = pc.fill_null(pc.list_value_length(faces), 0).to_numpy(zero_copy_only=False)
    flat = faces.flatten()
    parents = pc.list_parent_indices(faces).to_numpy(zero_copy_only=False)
    scores = flat.field("score").to_numpy(zero_copy_only=False).astype(np.float64)
    sides = np.minimum(
        flat.field("x2").to_numpy(zero_copy_only=False) - flat.field("x1").to_numpy(),
        flat.field("y2").to_numpy(zero_copy_only=False) - flat.field("y1").to_numpy(),
    ).astype(np.float64)
    scoring = scores >= min_score
    stats.detections = len(scores)
    stats.faces_all = np.bincount(
        np.minimum(counts, FACE_COUNT_BINS), minlength=FACE_COUNT_BINS + 1
    )
    per_image = np.bincount(parents[scoring], minlength=table.num_rows)
    stats.faces_scoring = np.bincount(
        np.minimum(per_image, FACE_COUNT_BINS), minlength=FACE_COUNT_BINS + 1
    )
    stats.box_scoring = _clipped_hist(sides[scoring], BOX_EDGES)
    stats.box_low = _clipped_hist(sides[~scoring], BOX_EDGES)
    stats.scores = _clipped_hist(scores, SCORE_EDGES)
    return stats


def face_stats(run_url: str, min_score: float) -> FaceStats | None:
    urls = storage.list_files(storage.join(run_url, "faces"), ".parquet")
    if not urls:
        return None
    total = FaceStats()
    for part in audit.parallel_map(lambda url: _face_stats(url, min_score), urls):
        total.merge(part)
    return total


def domain_failures(outcomes: pa.Table, top: int = TOP_DOMAINS) -> list[dict[str, Any]]:
    """The `top` domains with the most failed downloads: domain, rows, failed, failure rate."""
    if outcomes.num_rows == 0:
        return []
    hosts = pc.struct_field(pc.extract_regex(outcomes["URL"], _HOST), "host")
    hosts = pc.fill_null(pc.utf8_lower(hosts), "(not a URL)")
    failed = pc.not_equal(outcomes["status"], "success")
    table = pa.table({"domain": hosts, "failed": pc.cast(failed, pa.int64())})
    grouped = table.group_by("domain").aggregate([("failed", "sum"), ("failed", "count")])
    rows = [
        {"domain": r["domain"], "rows": r["failed_count"], "failed": r["failed_sum"]}
        for r in grouped.to_pylist()
        if r["failed_sum"]
    ]
    rows.sort(key=lambda r: (-r["failed"], r["domain"]))
    for row in rows:
        row["rate"] = row["failed"] / row["rows"]
    return rows[:top]


def failure_examples(outcomes: pa.Table, per_category: int = 3) -> dict[str, list[dict]]:
    """A few failed rows (URL, error message) of each category, the first in key order."""
    out: dict[str, list[dict]] = {}
    categories = pc.unique(outcomes["error_category"].drop_null()).to_pylist()
    for category in sorted(categories):
        rows = outcomes.filter(pc.equal(outcomes["error_category"], category))
        out[category] = rows.select(["URL", "error_message"]).slice(0, per_category).to_pylist()
    return out


# ---------------------------------------------------------------------------------------------
# Contact sheets


@dataclass
class Sample:
    """One image shown in a contact sheet."""

    key: str
    shard: str
    category: str  # "kept" or the drop reason
    note: str = ""  # e.g. "duplicate of 000010003 (distance 2)"
    caption: str | None = None
    url: str | None = None
    thumbnail: str | None = None  # data URI
    missing: str = ""  # why there is no thumbnail
    faces: str = ""  # "2 faces (1 counted)"


def _category_counts(result: audit.Funnel) -> dict[str, Counter[str]]:
    """{category: {raw shard: candidates}} for the images a contact sheet can show."""
    last = "dedup" if result.stage("dedup") else "select"
    out: dict[str, Counter[str]] = {}
    for stage_name in ("select", "dedup"):
        stage = result.stage(stage_name)
        if stage is None:
            continue
        for shard, outcome, reason, count in stage.shard_rows:
            if outcome == audit.DROPPED and count:
                out.setdefault(reason, Counter())[shard] += count
            elif outcome == audit.KEPT and count and stage_name == last:
                out.setdefault("kept", Counter())[shard] += count
    return out


def pick_sample_shards(
    counts: dict[str, Counter[str]], quota: dict[str, int], seed: int
) -> list[str]:
    """A few raw shards at random; more (up to MAX_SAMPLE_SHARDS) only for categories they lack."""
    shards = sorted({s for per_shard in counts.values() for s in per_shard})
    random.Random(seed).shuffle(shards)
    chosen: list[str] = []
    have: Counter[str] = Counter()
    for shard in shards:
        lacking = [c for c in counts if have[c] < quota[c] and counts[c][shard]]
        if len(chosen) >= MAX_SAMPLE_SHARDS:
            break
        if len(chosen) < SAMPLE_SHARDS or lacking:
            chosen.append(shard)
            for category in counts:
                have[category] += counts[category][shard]
        if len(chosen) >= SAMPLE_SHARDS and all(have[c] >= quota[c] for c in counts):
            break
    return sorted(chosen)


def choose_samples(run_url: str, result: audit.Funnel, seed: int) -> list[Sample]:
    counts = _category_counts(result)
    if not counts:
        return []
    quota = {c: KEPT_SAMPLES if c == "kept" else DROPPED_SAMPLES for c in counts}
    shards = pick_sample_shards(counts, quota, seed)
    candidates: dict[str, list[Sample]] = {}
    decisions = None
    if result.stage("dedup"):
        decisions = audit.read_columns(
            storage.join(run_url, "dedup", "decisions.parquet"),
            ["key", "kept", "reason", "duplicate_of", "distance"],
        )
    for shard in shards:
        select = audit.read_columns(
            storage.join(run_url, "select", f"{shard}.parquet"), ["key", "kept", "reason"]
        )
        for row in select.filter(pc.invert(pc.fill_null(select["kept"], False))).to_pylist():
            candidates.setdefault(row["reason"], []).append(
                Sample(row["key"], shard, row["reason"])
            )
        kept_keys = select.filter(pc.fill_null(select["kept"], False))["key"]
        if decisions is None:
            for key in kept_keys.to_pylist():
                candidates.setdefault("kept", []).append(Sample(key, shard, "kept"))
            continue
        mine = decisions.filter(pc.is_in(decisions["key"], value_set=kept_keys))
        for row in mine.to_pylist():
            if row["kept"]:
                candidates.setdefault("kept", []).append(Sample(row["key"], shard, "kept"))
                continue
            note = f"duplicate of {row['duplicate_of']}" if row["duplicate_of"] else ""
            if row["distance"] is not None and note:
                note += f" (pHash distance {row['distance']})"
            candidates.setdefault(row["reason"], []).append(
                Sample(row["key"], shard, row["reason"], note=note)
            )
    rng = random.Random(seed)
    chosen = []
    for category in sorted(candidates):
        pool = sorted(candidates[category], key=lambda s: s.key)
        picked = rng.sample(pool, min(quota.get(category, DROPPED_SAMPLES), len(pool)))
        chosen.extend(sorted(picked, key=lambda s: s.key))
    return chosen


def _tar_members(url: str, keys: set[str]) -> tuple[dict[str, bytes], str]:
    """The image bytes of `keys` from one webdataset tar, streamed in one pass (stopping once
    all are found); and why some could not be read ("" when none failed)."""
    found: dict[str, bytes] = {}
    fs, path = storage.fs_for(url)
    if not keys or not fs.exists(path):
        return found, f"no {posixpath.basename(url)}"

    def wanted(member: tars.Member) -> bool:
        return member.key in keys and member.key not in found and member.ext in IMAGE_EXTENSIONS

    try:
        with fs.open(path, "rb") as handle:
            for member, data in tars.iter_members(handle, source=url, wanted=wanted):
                if data is not None:
                    found[member.key] = data
                    if len(found) == len(keys):
                        break
    except tars.UnsafeTar as exc:
        return found, str(exc)
    return found, ""


def face_class(face: dict, rules: Any, area: float) -> str:
    """How select sees a face: counted, small (scores but fails a size rule) or low (score)."""
    if face["score"] < rules.min_score:
        return "low"
    w, h = face["x2"] - face["x1"], face["y2"] - face["y1"]
    if min(w, h) >= rules.min_face_size and w * h / max(area, 1) >= rules.min_face_fraction:
        return "counted"
    return "small"


BOX_COLORS = {"counted": GREEN, "small": ORANGE, "low": RED}
BOX_WIDTH = 2  # px in the thumbnail; a 1 px line blurs away in the JPEG


def _thumbnail(
    data: bytes, faces: list[dict], width: int, height: int, rules: Any, max_pixels: int
) -> tuple[str | None, str]:
    """(JPEG data URI with the boxes drawn, "") or (None, why not)."""
    decoded = decode_image(data, THUMB_SIDE, max_pixels)
    if decoded.pixels is None:
        return None, f"not decodable: {decoded.error}"
    image = Image.fromarray(decoded.pixels)
    # Boxes are in the upright full-size frame the faces stage recorded (width x height).
    width, height = width or decoded.width, height or decoded.height
    sx, sy = image.width / max(width, 1), image.height / max(height, 1)
    draw = ImageDraw.Draw(image)
    for face in faces:
        color = BOX_COLORS[face_class(face, rules, width * height)]
        box = [face["x1"] * sx, face["y1"] * sy, face["x2"] * sx, face["y2"] * sy]
        draw.rectangle(box, outline=color, width=BOX_WIDTH)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), ""


def render_samples(run_url: str, samples: list[Sample], config: Config) -> None:
    """Fill in caption, URL and a thumbnail with boxes for every sample, one raw shard at a time."""
    by_shard: dict[str, list[Sample]] = {}
    for sample in samples:
        by_shard.setdefault(sample.shard, []).append(sample)
    rules = config.select

    def fill(shard: str) -> None:
        mine = {s.key: s for s in by_shard[shard]}
        keys = pa.array(sorted(mine), pa.string())
        raw_url = storage.join(run_url, "raw", f"{shard}.parquet")
        if storage.exists(raw_url):
            columns = [c for c in ("key", "caption", "url") if c in audit.column_names(raw_url)]
            raw = audit.read_columns(raw_url, columns)
            for row in raw.filter(pc.is_in(raw["key"], value_set=keys)).to_pylist():
                mine[row["key"]].caption, mine[row["key"]].url = row.get("caption"), row.get("url")
        faces_url = storage.join(run_url, "faces", f"{shard}.parquet")
        detections = {}
        if storage.exists(faces_url):
            faces = audit.read_columns(
                faces_url, ["key", "width", "height", "decode_error", "faces"]
            )
            faces = faces.filter(pc.is_in(faces["key"], value_set=keys))
            detections = {row["key"]: row for row in faces.to_pylist()}
        images, unreadable = _tar_members(storage.join(run_url, "raw", f"{shard}.tar"), set(mine))
        for key, sample in mine.items():
            row = detections.get(key) or {"width": 0, "height": 0, "decode_error": None}
            found = row.get("faces") or []
            area = (row["width"] or 0) * (row["height"] or 0)
            counted = sum(face_class(f, rules, area) == "counted" for f in found)
            sample.faces = f"{len(found)} detection(s), {counted} counted"
            if row["decode_error"]:
                sample.missing = f"decode error: {row['decode_error']}"
            elif key not in images:
                sample.missing = unreadable or f"no image for this key in raw/{shard}.tar"
            else:
                sample.thumbnail, sample.missing = _thumbnail(
                    images[key],
                    found,
                    row["width"] or 0,
                    row["height"] or 0,
                    rules,
                    config.faces.max_image_pixels,
                )

    audit.parallel_map(fill, sorted(by_shard))


# ---------------------------------------------------------------------------------------------
# HTML


def _table(header: list[tuple[str, bool]], rows: list[list[str]], **attrs: str) -> str:
    """A table of already-escaped cells; header is (title, numeric) per column."""
    extra = "".join(f' {name.replace("_", "-")}="{_escape(v)}"' for name, v in attrs.items())
    head = "".join(f"<th{' class=n' if numeric else ''}>{_escape(t)}</th>" for t, numeric in header)
    body = []
    for row in rows:
        cells = "".join(
            f"<td{' class=n' if header[i][1] else ''}>{cell}</td>" for i, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table{extra}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{_escape(text)}</p>'


def _absent(stage: str) -> str:
    return _note(f"No data: the {stage} stage has no output in this run folder.")


def _section_funnel(result: audit.Funnel) -> str:
    parts = []
    if result.ok:
        parts.append(
            '<p class="ok">Conservation checked: every input row is kept, or dropped once for one'
            " reason.</p>"
        )
    else:
        items = "".join(f"<li>{_escape(p)}</li>" for p in result.problems)
        parts.append(
            '<div class="problem"><strong>The funnel does not add up</strong>; these figures'
            f" can't be relied on until the stages named are redone:<ul>{items}</ul></div>"
        )
    rows_html = []
    for row in result.rows():
        cls = {"input": "stage-in", "kept": "kept"}.get(row["outcome"], "dropped")
        rows_html.append(
            f'<tr class="{cls}"><td>{_escape(row["stage"])}</td>'
            f"<td>{_escape(audit.reason_label(row))}</td>"
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
        f" ({audit.pct(result.kept, result.input_rows):.2f}%) after {_escape(last)}.</p>"
    )
    if result.not_run:
        parts.append(_note(f"Stages without output: {', '.join(result.not_run)}."))
    if result.disabled:
        parts.append(_note(f"Stages turned off in the config: {', '.join(result.disabled)}."))
    labels = ["input"] + [f"after {s.stage}" for s in result.stages]
    values = [result.input_rows] + [s.kept for s in result.stages]
    fig = _figure(7.5, 0.35 * len(labels) + 1.0)
    ax = fig.add_subplot()
    ax.barh(np.arange(len(labels)), values, color="#4a7fc1")
    ax.set_yticks(np.arange(len(labels)), labels=labels)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    parts.append(_png(fig, "rows remaining after each stage"))
    return "".join(parts)


def _section_download_failures(result: audit.Funnel) -> str:
    stage = result.stage("download")
    if stage is None:
        return _absent("download")
    if not stage.dropped:
        return _note(f"No download failures: all {stage.input:,} rows downloaded.")
    outcomes = result.tables.get("outcomes")
    examples = failure_examples(outcomes) if outcomes is not None else {}
    rows = []
    for category, count in stage.dropped.items():
        shown = "<br>".join(
            f"<code>{_escape(e['URL'], URL_CHARS)}</code>: {_escape(e['error_message'], 200)}"
            for e in examples.get(category, [])
        )
        rows.append(
            [
                _escape(category),
                f"{count:,}",
                f"{audit.pct(count, stage.input):.2f}%",
                shown,
            ]
        )
    table = _table(
        [("category", False), ("rows", True), ("% of download input", True), ("examples", False)],
        rows,
        id="download-failures-table",
    )
    plot = _barh_plot(
        list(stage.dropped), list(stage.dropped.values()), "failed rows", "failures by category"
    )
    summary = (
        f"<p>{stage.dropped_total:,} of {stage.input:,} rows failed to download"
        f" ({audit.pct(stage.dropped_total, stage.input):.2f}%); each row is counted once, under"
        " its latest attempt.</p>"
    )
    return summary + table + plot


def _section_domains(result: audit.Funnel) -> str:
    outcomes = result.tables.get("outcomes")
    if outcomes is None:
        return _absent("download")
    top = domain_failures(outcomes)
    if not top:
        return _note("No download failures.")
    rows = [
        [_escape(r["domain"]), f"{r['rows']:,}", f"{r['failed']:,}", f"{100 * r['rate']:.1f}%"]
        for r in top
    ]
    table = _table(
        [("domain", False), ("rows", True), ("failed", True), ("failure rate", True)],
        rows,
        id="domains-table",
    )
    plot = _barh_plot(
        [r["domain"] for r in top], [r["failed"] for r in top], "failed rows", "failures by domain"
    )
    return table + plot


def _section_resolution(stats: FaceStats | None, config: Config) -> str:
    if stats is None:
        return _absent("faces")
    marks = (
        {"select.min_image_side": config.select.min_image_side}
        if config.select.min_image_side
        else {}
    )
    plot = _hist_plot(
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
        return _absent("faces")
    labels = [str(i) for i in range(FACE_COUNT_BINS)] + [f"{FACE_COUNT_BINS}+"]
    fig = _figure()
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
    table = _table(
        [
            ("faces", False),
            ("images (detections)", True),
            (f"images (score >= {config.select.min_score})", True),
        ],
        rows,
        id="faces-per-image-table",
    )
    return _png(fig, "faces per image") + table


def _section_face_size(stats: FaceStats | None, config: Config) -> str:
    if stats is None:
        return _absent("faces")
    plot = _hist_plot(
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
        return _absent("faces")
    return _hist_plot(
        {"detections": stats.scores},
        SCORE_EDGES,
        "detection score",
        logy=True,
        marks={"select.min_score": config.select.min_score},
        alt="detection scores",
    )


def _section_duplicates(run_url: str, result: audit.Funnel) -> str:
    stage = result.stage("dedup")
    if stage is None:
        return _absent("dedup")
    decisions = audit.read_columns(
        storage.join(run_url, "dedup", "decisions.parquet"), ["key", "kept", "cluster"]
    )
    clustered = decisions.filter(pc.is_valid(decisions["cluster"]))
    sizes = clustered.group_by("cluster").aggregate([("key", "count")])
    sizes = sizes.filter(pc.greater(sizes["key_count"], 1)).sort_by(
        [("key_count", "descending"), ("cluster", "ascending")]
    )
    counts = [
        [_escape(reason), f"{n:,}", f"{audit.pct(n, stage.input):.2f}%"]
        for reason, n in stage.dropped.items()
    ]
    parts = [
        f"<p>{stage.dropped_total:,} of {stage.input:,} selected images dropped as duplicates;"
        f" {sizes.num_rows:,} clusters with more than one image.</p>",
        _table(
            [("reason", False), ("images", True), ("% of dedup input", True)],
            counts,
            id="duplicates-table",
        ),
    ]
    if sizes.num_rows:
        values = sizes["key_count"].to_numpy()
        cap = 20
        bins = np.bincount(np.minimum(values, cap), minlength=cap + 1)[2:]
        labels = [str(i) for i in range(2, cap)] + [f"{cap}+"]
        fig = _figure()
        ax = fig.add_subplot()
        ax.bar(np.arange(len(labels)), bins, color="#8e6cc1")
        ax.set_xticks(np.arange(len(labels)), labels=labels)
        if bins.max() > 50:  # web data: many pairs, a few huge clusters
            ax.set_yscale("symlog", linthresh=1)
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("images in the cluster")
        ax.set_ylabel("clusters")
        parts.append(_png(fig, "duplicate cluster sizes"))
        largest = sizes.slice(0, 10)
        keepers = decisions.filter(
            pc.and_(
                pc.fill_null(decisions["kept"], False),
                pc.is_in(decisions["cluster"], value_set=largest["cluster"]),
            )
        )
        keeper_of = dict(
            zip(keepers["cluster"].to_pylist(), keepers["key"].to_pylist(), strict=True)
        )
        rows = [
            [str(r["cluster"]), f"{r['key_count']:,}", _escape(keeper_of.get(r["cluster"], ""))]
            for r in largest.to_pylist()
        ]
        parts.append("<h3>Largest clusters</h3>")
        parts.append(_table([("cluster", True), ("images", True), ("kept key", False)], rows))
    return "".join(parts)


def _shard_ticks(ax: Any, names: list[str], most: int = 16) -> None:
    """Shard names under at most `most` evenly spaced ticks."""
    step = max(1, -(-len(names) // most))
    positions = list(range(0, len(names), step))
    ax.set_xticks(positions, labels=[names[i] for i in positions], rotation=45, fontsize=8)


def _section_shards(result: audit.Funnel) -> str:
    parts = []
    series: dict[str, dict[str, int]] = {}
    for name, label in (
        ("faces", "downloaded"),
        ("select", "kept by select"),
        ("dedup", "kept by dedup"),
        ("emit", "published"),
    ):
        stage = result.stage(name)
        if stage is not None:
            series[label] = {s: n for s, o, _, n in stage.shard_rows if o == audit.KEPT}
    dataset = result.tables.get("dataset_shards")
    if not series and dataset is None:
        return _absent("download")
    if series:
        shards = sorted({s for per_shard in series.values() for s in per_shard})
        fig = _figure()
        ax = fig.add_subplot()
        x = np.arange(len(shards))
        for label, per_shard in series.items():
            ax.plot(
                x,
                [per_shard.get(s, 0) for s in shards],
                marker="o" if len(shards) <= 60 else None,
                label=label,
            )
        _shard_ticks(ax, shards)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("raw shard")
        ax.set_ylabel("images")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        parts.append("<h3>Per raw shard</h3>")
        parts.append(_png(fig, "images per raw shard"))
    if dataset is not None:
        sizes = dict(zip(dataset["shard"].to_pylist(), dataset["samples"].to_pylist(), strict=True))
        values = np.array(list(sizes.values()) or [0])
        parts.append("<h3>Per dataset shard</h3>")
        parts.append(
            f"<p>{len(sizes):,} dataset shards, {int(values.sum()):,} samples:"
            f" min {int(values.min()):,}, median {int(np.median(values)):,},"
            f" max {int(values.max()):,} per shard.</p>"
        )
        fig = _figure()
        ax = fig.add_subplot()
        ax.bar(np.arange(len(sizes)), list(sizes.values()), color="#4a7fc1")
        _shard_ticks(ax, list(sizes))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("dataset shard")
        ax.set_ylabel("samples")
        parts.append(_png(fig, "samples per dataset shard"))
        if len(sizes) <= 100:
            parts.append(
                _table(
                    [("shard", False), ("samples", True)],
                    [[_escape(s), f"{n:,}"] for s, n in sizes.items()],
                    id="dataset-shards-table",
                )
            )
    else:
        parts.append(_absent("emit"))
    return "".join(parts)


LEGEND = (
    '<p class="legend"><span style="border-color:rgb(0,200,70)">counted face</span>'
    '<span style="border-color:rgb(255,150,0)">scores, but too small</span>'
    '<span style="border-color:rgb(230,30,30)">below select.min_score</span></p>'
)


def _card(sample: Sample) -> str:
    if sample.thumbnail:
        image = f'<img alt="{_escape(sample.key)}" src="{sample.thumbnail}">'
    else:
        image = f'<div class="missing">{_escape(sample.missing, 200)}</div>'
    note = f"<div>{_escape(sample.note)}</div>" if sample.note else ""
    return (
        f'<div class="card" data-key="{_escape(sample.key)}">{image}'
        f"<div><b>{_escape(sample.key)}</b> · {_escape(sample.faces)}</div>{note}"
        f'<div class="caption">{_escape(sample.caption, CAPTION_CHARS)}</div>'
        f"<code>{_escape(sample.url, URL_CHARS)}</code></div>"
    )


def _sheet(samples: list[Sample]) -> str:
    return '<div class="sheet">' + "".join(_card(s) for s in samples) + "</div>"


def _section_kept(samples: list[Sample], result: audit.Funnel) -> str:
    kept = [s for s in samples if s.category == "kept"]
    if not kept:
        return _absent("select") if result.stage("select") is None else _note("No kept samples.")
    last = "dedup" if result.stage("dedup") else "select"
    return f"<p>{len(kept)} random samples kept after {last}.</p>" + LEGEND + _sheet(kept)


def _anchor(reason: str) -> str:
    return "dropped-" + re.sub(r"[^a-z0-9_-]+", "-", reason.lower())


def _section_dropped(samples: list[Sample], result: audit.Funnel) -> str:
    if result.stage("select") is None:
        return _absent("select")
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
        parts.append(_note("Nothing was dropped by select or dedup."))
    for stage_name, reason, count in reasons:
        mine = [s for s in dropped if s.category == reason]
        parts.append(
            f'<h3 id="{_anchor(reason)}">{_escape(stage_name)}: {_escape(reason)}'
            f" ({count:,} images, {len(mine)} shown)</h3>"
        )
        parts.append(_sheet(mine))
    return "".join(parts)


def run_settings(run_url: str) -> Config:
    """The run's config as far as the report uses it ([run], [faces], [select]); the other
    sections are left at their defaults (run.json writes inf as null, which they don't accept)."""
    data = audit.run_config(run_url)
    return Config.model_validate({k: data[k] for k in ("run", "faces", "select") if k in data})


def build_report(run_url: str, result: audit.Funnel | None = None) -> str:
    """The report of the run at `run_url`, as one HTML document (`result`: its funnel, when
    already computed)."""
    result = result or audit.funnel(run_url)
    config = run_settings(run_url)
    stats = face_stats(run_url, config.select.min_score) if result.stage("faces") else None
    samples = choose_samples(run_url, result, config.run.seed) if result.stage("select") else []
    render_samples(run_url, samples, config)
    bodies = {
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
    nav = "".join(f'<a href="#{sid}">{_escape(title)}</a>' for sid, title in SECTIONS)
    sections = "".join(
        f'<section id="{sid}"><h2>{_escape(title)}</h2>{bodies[sid]}</section>'
        for sid, title in SECTIONS
    )
    run_json = storage.join(run_url, "run.json")
    created = storage.read_json(run_json).get("created", "") if storage.exists(run_json) else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';'
        " img-src data:; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>laionface report: {_escape(config.run.name)}</title><style>{CSS}</style></head>"
        f"<body><header><h1>laionface report: {_escape(config.run.name)}</h1>"
        f"<p>run folder <code>{_escape(run_url)}</code>"
        f"{' · created ' + _escape(created) if created else ''} · seed {config.run.seed}</p>"
        f"<nav>{nav}</nav></header><main>{sections}</main></body></html>\n"
    )


def write_report(run_url: str, out: str | None = None, result: audit.Funnel | None = None) -> str:
    """Write the report (default `RUN/audit/report.html`) atomically; returns where it went."""
    out = out or storage.join(run_url, "audit", "report.html")
    storage.write_bytes(out, build_report(run_url, result).encode("utf-8"))
    return out


def report_command(run_url: str, out: str | None = None, stream: TextIO | None = None) -> int:
    """`laionface report RUN [--out FILE]`: 0 when written from a funnel that adds up, else 1
    (the report is written all the same, with the problems at the top)."""
    stream = stream or sys.stdout
    try:
        result = audit.funnel(run_url)
        path = write_report(run_url, out, result)
    except audit.AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}", file=stream)
    if not result.ok:
        print(f"error: {audit.ConservationError(result.problems)}", file=sys.stderr)
        return 1
    return 0
