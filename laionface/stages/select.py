"""Select stage: keep the images whose recorded detections pass the `[select]` thresholds.

It reads only `faces/NNNNN.parquet` (the detector is never run again), so `laionface run ...
--stages select --set select.min_score=0.95` re-applies new thresholds in seconds. The rules and
the order of the drop reasons are `laionface.selection`'s.

Output `select/NNNNN.parquet` (schemas.SELECT): per image, kept or its one drop reason,
`n_faces`, the number of counted faces (the faces a user gets), and `counted`, which of its
detections count (emit publishes that flag with each face).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from laionface import selection
from laionface.config import SelectSection
from laionface.engine.runner import ShardTask, StageContext
from laionface.engine.stage import Stage
from laionface.io import schemas, storage
from laionface.layout import FACES, SELECT, SELECT_REASONS, shard_of_file


def select_shard(faces_url: str, out_url: str, rules: dict) -> dict:
    """Decide every image of one faces shard; returns counts per reason."""
    section = SelectSection.model_validate(rules)
    table = storage.read_parquet(
        faces_url, columns=["key", "SAMPLE_ID", "width", "height", "decode_error", "faces"]
    )
    decided = selection.decide_table(table, section)
    reasons = np.array([None, *SELECT_REASONS], object)[decided.reason + 1]
    out = pa.table(
        {
            "key": table["key"],
            "SAMPLE_ID": table["SAMPLE_ID"],
            "kept": decided.kept,
            "reason": pa.array(reasons, pa.string()),
            "n_faces": decided.n_faces,
            "counted": decided.counted,
        },
        schema=schemas.SELECT,
    )
    storage.write_parquet(out, out_url)
    rows = table.num_rows
    dropped = dict(Counter(r for r in reasons.tolist() if r is not None))
    return {"items": rows, "kept": rows - sum(dropped.values()), "dropped": dropped}


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
