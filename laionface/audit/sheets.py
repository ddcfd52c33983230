"""The report's contact sheets: random kept and dropped samples, with their detections drawn.

Samples are chosen from `run.seed`, so the same run gives the same report. Boxes are green for
faces select counts, orange for faces that score but are too small, red for detections below
`select.min_score` (laionface.selection). To keep the reading bounded on a big run, samples come
from a few raw shards (picked at random, plus one more for each rare drop reason the first ones
lack), and only those shards' tars are read, streamed, member by member.
"""

from __future__ import annotations

import base64
import io
import posixpath
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from laionface import selection
from laionface.audit.html import escape
from laionface.audit.model import DROPPED, KEPT, Funnel
from laionface.audit.read import column_names, parallel_map, read_columns
from laionface.config import Config
from laionface.io import keyed, storage, tars
from laionface.io.imagedecode import decode_image
from laionface.layout import IMAGE_EXTENSIONS, RunLayout, key_prefix

KEPT_SAMPLES = 24


DROPPED_SAMPLES = 8  # per drop reason


# Raw shards read for thumbnails: this many at random, up to the maximum to cover rare reasons.
SAMPLE_SHARDS = 4


MAX_SAMPLE_SHARDS = 12


THUMB_SIDE = 224


CAPTION_CHARS = 300


URL_CHARS = 200


GREEN, ORANGE, RED = (0, 200, 70), (255, 150, 0), (230, 30, 30)


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
    keeper: bool = False  # the image dedup kept of its cluster (drawn with a green frame)


def _category_counts(result: Funnel) -> dict[str, Counter[str]]:
    """{category: {raw shard: candidates}} for the images a contact sheet can show."""
    last = "dedup" if result.stage("dedup") else "select"
    out: dict[str, Counter[str]] = {}
    for stage_name in ("select", "dedup"):
        stage = result.stage(stage_name)
        if stage is None:
            continue
        for shard, outcome, reason, count in stage.shard_rows:
            if outcome == DROPPED and count:
                out.setdefault(reason, Counter())[shard] += count
            elif outcome == KEPT and count and stage_name == last:
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


def choose_samples(
    run_url: str, result: Funnel, seed: int, per_reason: int = DROPPED_SAMPLES
) -> list[Sample]:
    """KEPT_SAMPLES kept images and `per_reason` of each drop reason of select and dedup, at
    random (from `seed`), from a few raw shards (pick_sample_shards)."""
    counts = _category_counts(result)
    if not counts:
        return []
    quota = {c: KEPT_SAMPLES if c == "kept" else per_reason for c in counts}
    shards = pick_sample_shards(counts, quota, seed)
    candidates: dict[str, list[Sample]] = {}
    layout = RunLayout(run_url)
    decided = result.stage("dedup") is not None
    for shard in shards:
        select = read_columns(layout.select(shard), ["key", "kept", "reason"])
        for row in select.filter(pc.invert(pc.fill_null(select["kept"], False))).to_pylist():
            candidates.setdefault(row["reason"], []).append(
                Sample(row["key"], shard, row["reason"])
            )
        kept_keys = select.filter(pc.fill_null(select["kept"], False))["key"]
        if not decided:
            for key in kept_keys.to_pylist():
                candidates.setdefault("kept", []).append(Sample(key, shard, "kept"))
            continue
        decisions = keyed.read_prefix(
            layout.dedup_decisions,
            key_prefix(shard),
            ["key", "kept", "reason", "duplicate_of", "distance"],
        )
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
        picked = rng.sample(pool, min(quota.get(category, per_reason), len(pool)))
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


BOX_COLORS = {selection.COUNTED: GREEN, selection.SMALL: ORANGE, selection.LOW: RED}


BOX_WIDTH = 2  # px in the thumbnail; a 1 px line blurs away in the JPEG


def thumbnail(
    data: bytes, faces: list[dict], width: int, height: int, rules: Any, max_pixels: int
) -> tuple[str | None, str]:
    """(JPEG data URI with the boxes drawn, "") or (None, why not)."""
    # PIL's resize: the report is a torch-free command.
    decoded = decode_image(data, THUMB_SIDE, max_pixels, torch_resize=False)
    if decoded.pixels is None:
        return None, f"not decodable: {decoded.error}"
    image = Image.fromarray(decoded.pixels)
    # Boxes are in the upright full-size frame the faces stage recorded (width x height).
    width, height = width or decoded.width, height or decoded.height
    sx, sy = image.width / max(width, 1), image.height / max(height, 1)
    draw = ImageDraw.Draw(image)
    for face in faces:
        color = BOX_COLORS[selection.face_class(face, rules, width * height)]
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
    layout = RunLayout(run_url)

    def fill(shard: str) -> None:
        mine = {s.key: s for s in by_shard[shard]}
        keys = pa.array(sorted(mine), pa.string())
        raw_url = layout.raw_parquet(shard)
        if storage.exists(raw_url):
            columns = [c for c in ("key", "caption", "url") if c in column_names(raw_url)]
            raw = read_columns(raw_url, columns)
            for row in raw.filter(pc.is_in(raw["key"], value_set=keys)).to_pylist():
                mine[row["key"]].caption, mine[row["key"]].url = row.get("caption"), row.get("url")
        faces_url = layout.faces(shard)
        detections = {}
        if storage.exists(faces_url):
            faces = read_columns(faces_url, ["key", "width", "height", "decode_error", "faces"])
            faces = faces.filter(pc.is_in(faces["key"], value_set=keys))
            detections = {row["key"]: row for row in faces.to_pylist()}
        images, unreadable = _tar_members(layout.raw_tar(shard), set(mine))
        for key, sample in mine.items():
            row = detections.get(key) or {"width": 0, "height": 0, "decode_error": None}
            found = row.get("faces") or []
            area = (row["width"] or 0) * (row["height"] or 0)
            counted = sum(selection.face_class(f, rules, area) == selection.COUNTED for f in found)
            sample.faces = f"{len(found)} detection(s), {counted} counted"
            if row["decode_error"]:
                sample.missing = f"decode error: {row['decode_error']}"
            elif key not in images:
                sample.missing = unreadable or f"no image for this key in raw/{shard}.tar"
            else:
                sample.thumbnail, sample.missing = thumbnail(
                    images[key],
                    found,
                    row["width"] or 0,
                    row["height"] or 0,
                    rules,
                    config.faces.max_image_pixels,
                )

    parallel_map(fill, sorted(by_shard))


LEGEND = (
    '<p class="legend"><span style="border-color:rgb(0,200,70)">counted face</span>'
    '<span style="border-color:rgb(255,150,0)">scores, but too small</span>'
    '<span style="border-color:rgb(230,30,30)">below select.min_score</span></p>'
)


def _card(sample: Sample) -> str:
    if sample.thumbnail:
        image = f'<img alt="{escape(sample.key)}" src="{sample.thumbnail}">'
    else:
        image = f'<div class="missing">{escape(sample.missing, 200)}</div>'
    note = f"<div>{escape(sample.note)}</div>" if sample.note else ""
    kind = "card keeper" if sample.keeper else "card"
    return (
        f'<div class="{kind}" data-key="{escape(sample.key)}">{image}'
        f"<div><b>{escape(sample.key)}</b> · {escape(sample.faces)}</div>{note}"
        f'<div class="caption">{escape(sample.caption, CAPTION_CHARS)}</div>'
        f"<code>{escape(sample.url, URL_CHARS)}</code></div>"
    )


def sheet(samples: list[Sample]) -> str:
    return '<div class="sheet">' + "".join(_card(s) for s in samples) + "</div>"
