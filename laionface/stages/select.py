"""Select stage: keep the images whose recorded detections pass the `[select]` thresholds.

It reads only `faces/NNNNN.parquet` (the detector is never run again), so `laionface run ...
--stages select --set select.min_score=0.95` re-applies new thresholds in seconds. The rules and
the order of the drop reasons are `laionface.selection`'s.

Output `select/NNNNN.parquet` (schemas.SELECT): per image, kept or its one drop reason,
`n_faces`, the number of counted faces (the faces a user gets), and `counted`, which of its
detections count (emit publishes that flag with each face).
"""

from __future__ import annotations

import pyarrow as pa

from laionface import selection
from laionface.config import SelectSection
from laionface.engine.runner import ShardTask, StageContext
from laionface.engine.stage import Stage
from laionface.io import schemas, storage
from laionface.layout import FACES, SELECT, shard_of_file


def select_shard(faces_url: str, out_url: str, rules: dict) -> dict:
    """Decide every image of one faces shard; returns counts per reason."""
    section = SelectSection.model_validate(rules)
    table = storage.read_parquet(
        faces_url, columns=["key", "SAMPLE_ID", "width", "height", "decode_error", "faces"]
    )
    rows = []
    dropped: dict[str, int] = {}
    for row in table.to_pylist():
        reason, n_faces = selection.decide(row, section)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        rows.append(
            {
                "key": row["key"],
                "SAMPLE_ID": row["SAMPLE_ID"],
                "kept": reason is None,
                "reason": reason,
                "n_faces": n_faces,
                "counted": [c == selection.COUNTED for c in selection.classes(row, section)],
            }
        )
    storage.write_parquet(pa.Table.from_pylist(rows, schema=schemas.SELECT), out_url)
    return {"items": len(rows), "kept": len(rows) - sum(dropped.values()), "dropped": dropped}


def run(ctx: StageContext) -> None:
    rules = ctx.config.select.model_dump()
    tasks = []
    for faces_url in storage.list_files(ctx.layout.faces_folder, ".parquet"):
        shard = shard_of_file(faces_url)
        out_url = ctx.layout.select(shard)
        tasks.append(
            ShardTask(
                shard,
                dict(faces_url=faces_url, out_url=out_url, rules=rules),
                inputs=(faces_url,),
                outputs=(out_url,),
            )
        )
    ctx.map_shards("select", select_shard, tasks, unit="images")


STAGE = Stage(
    name="select",
    reads=(FACES,),
    writes=(SELECT,),
    settings=("select",),
    run=run,
)
