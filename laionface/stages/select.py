"""Select stage: keep the images whose recorded detections pass the `[select]` thresholds.

It reads only `faces/NNNNN.parquet` (the detector is never run again), so `laionface run ...
--stages select --set select.min_score=0.95` re-applies new thresholds in seconds.

Each dropped image gets exactly one reason, the first that applies in this order:
1. `decode_error`: the image could not be decoded (the faces stage recorded why).
2. `image_too_small`: min(width, height) < `min_image_side`.
3. `no_face`: fewer detections than `min_faces` at all (at `faces.record_threshold`).
4. `low_score`: fewer than `min_faces` detections score at least `min_score`.
5. `too_many_faces`: more than `max_faces` detections score at least `min_score`.
6. `face_too_small`: fewer than `min_faces` of the scoring faces have a box whose shorter side is
   at least `min_face_size` px and whose area is at least `min_face_fraction` of the image.
`n_faces` is the number of faces passing score and size rules (the faces a user gets).
"""

from __future__ import annotations

import pyarrow as pa

from laionface.config import SelectSection, fingerprint
from laionface.engine.runner import ShardTask, StageContext
from laionface.io import schemas, storage

REASONS = (
    "decode_error",
    "image_too_small",
    "no_face",
    "low_score",
    "too_many_faces",
    "face_too_small",
)


def decide(row: dict, rules: SelectSection) -> tuple[str | None, int]:
    """(drop reason or None, number of usable faces) for one row of a faces parquet."""
    if row["decode_error"]:
        return "decode_error", 0
    width, height = row["width"] or 0, row["height"] or 0
    if min(width, height) < rules.min_image_side:
        return "image_too_small", 0
    faces = row["faces"] or []
    if len(faces) < rules.min_faces:
        return "no_face", 0
    scoring = [f for f in faces if f["score"] >= rules.min_score]
    if len(scoring) < rules.min_faces:
        return "low_score", 0
    if rules.max_faces is not None and len(scoring) > rules.max_faces:
        return "too_many_faces", 0
    area = max(width * height, 1)
    usable = [
        f
        for f in scoring
        if min(f["x2"] - f["x1"], f["y2"] - f["y1"]) >= rules.min_face_size
        and (f["x2"] - f["x1"]) * (f["y2"] - f["y1"]) / area >= rules.min_face_fraction
    ]
    if len(usable) < rules.min_faces:
        return "face_too_small", len(usable)
    return None, len(usable)


def select_shard(faces_url: str, out_url: str, rules: dict) -> dict:
    """Decide every image of one faces shard; returns counts per reason."""
    section = SelectSection.model_validate(rules)
    table = storage.read_parquet(
        faces_url, columns=["key", "SAMPLE_ID", "width", "height", "decode_error", "faces"]
    )
    rows = []
    dropped: dict[str, int] = {}
    for row in table.to_pylist():
        reason, n_faces = decide(row, section)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        rows.append(
            {
                "key": row["key"],
                "SAMPLE_ID": row["SAMPLE_ID"],
                "kept": reason is None,
                "reason": reason,
                "n_faces": n_faces,
            }
        )
    storage.write_parquet(pa.Table.from_pylist(rows, schema=schemas.SELECT), out_url)
    return {"items": len(rows), "kept": len(rows) - sum(dropped.values()), "dropped": dropped}


def run(ctx: StageContext) -> None:
    rules = ctx.config.select.model_dump()
    tasks = []
    for faces_url in storage.list_files(ctx.path("faces"), ".parquet"):
        shard = faces_url.rsplit("/", 1)[1][: -len(".parquet")]
        out_url = ctx.path("select", f"{shard}.parquet")
        tasks.append(ShardTask(shard, dict(faces_url=faces_url, out_url=out_url, rules=rules)))
    ctx.map_shards(
        "select", select_shard, tasks, fingerprint=fingerprint(ctx.config, "select"), unit="images"
    )
