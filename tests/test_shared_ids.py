"""LAION's SAMPLE_ID is not a unique key: rows that share one are counted, warned about and kept."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from laionface.audit.report import build_report
from laionface.config import parse_config
from laionface.engine.pipeline import run_pipeline
from laionface.io import schemas


def test_shared_sample_ids_are_counted_in_the_summary_and_the_report(tmp_path, caplog):
    ids = [1, 2, 2, 3, 3, 3, 4, 5]  # 2 and 3 shared: 2 IDs by 5 rows
    rows = [
        {
            "SAMPLE_ID": sample_id,
            "URL": f"http://img.example.com/{i}.jpg",
            "TEXT": f"a face {i}",
            "HEIGHT": 300,
            "WIDTH": 400,
            "LICENSE": "?",
            "NSFW": "UNLIKELY",
            "similarity": 0.35,
        }
        for i, sample_id in enumerate(ids)
    ]
    source = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schemas.LAION_METADATA), source)
    config = parse_config(
        {
            "metadata": {"input": [str(source)], "rows_per_shard": 3},
            "cluster": {"workers": 1, "dashboard_address": ""},
        }
    )
    run = run_pipeline(config, run_dir=str(tmp_path / "run"), stages="metadata", progress=False)

    summary = json.loads((tmp_path / "run" / "metadata" / "summary.json").read_text())
    assert summary["kept_rows"] == len(ids)  # every row kept, shared IDs included
    assert summary["shared_sample_ids"] == {"ids": 2, "rows": 5, "examples": [2, 3]}
    assert "2 SAMPLE_IDs are shared by 5 kept rows" in caplog.text
    assert "2 SAMPLE_IDs are shared by 5 kept metadata rows (e.g. 2, 3)" in build_report(run.url)
