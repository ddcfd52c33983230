"""The metadata stage: each filter, conservation per file, LAION-Face's ID list, shards, bad input."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from laionface.config import Config, parse_config
from laionface.engine.cluster import open_client
from laionface.engine.pipeline import run_pipeline, stage_of
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext
from laionface.io import schemas, storage
from laionface.layout import METADATA_REASONS
from laionface.stages.metadata import filters, idlists
from laionface.stages.metadata import stage as metadata_stage
from laionface.stages.metadata.idlists import IdListError
from laionface.stages.metadata.inputs import MetadataError
from tests.conftest import S3_BUCKET

DEFAULT_ROW = {
    "URL": None,  # filled from SAMPLE_ID when not given
    "TEXT": "a photo of a face",
    "HEIGHT": 480,
    "WIDTH": 640,
    "LICENSE": "?",
    "NSFW": "UNLIKELY",
    "similarity": 0.35,
}


def laion_table(rows: list[dict]) -> pa.Table:
    """Rows in LAION-400M's schema; unset fields take DEFAULT_ROW's values."""
    full = []
    for row in rows:
        values = {**DEFAULT_ROW, **row}
        if "URL" not in row:
            values["URL"] = f"https://img.example.com/{row['SAMPLE_ID']}.jpg"
        full.append(values)
    return pa.Table.from_pylist(full, schema=schemas.LAION_METADATA)


def write_input(path: Path, rows: list[dict], row_group_size: int | None = None) -> str:
    pq.write_table(laion_table(rows), path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope="module")
def client():
    """One Dask cluster for the module: memory:// run folders, so thread workers (fast start)."""
    config = Config()
    config.cluster.dashboard_address = ""
    with open_client(config, "memory://metadata-tests") as dask_client:
        yield dask_client
    fsspec.filesystem("memory").rm("/metadata-tests", recursive=True)


METADATA_STAGE = stage_of("metadata")


def run_stage(client, settings: dict, run_url: str = "") -> StageContext:
    run_url = run_url or f"memory://metadata-tests/{uuid.uuid4().hex}"
    config = parse_config(
        {"metadata": settings, "cluster": {"retries": 0, "dashboard_address": ""}}
    )
    run = RunFolder(run_url)
    run.start(config)
    ctx = StageContext(config, run, client, progress=False, stage=METADATA_STAGE)
    METADATA_STAGE.run(ctx)
    return ctx


def shard_rows(ctx: StageContext) -> pa.Table:
    urls = storage.list_files(ctx.path("metadata", "shards"), ".parquet")
    return pa.concat_tables([storage.read_parquet(u) for u in urls])


def drop_counts(ctx: StageContext) -> dict[tuple[str, str], int]:
    """(source, reason) -> count over every file in metadata/drops/."""
    counts: dict[tuple[str, str], int] = {}
    for url in storage.list_files(ctx.path("metadata", "drops"), ".parquet"):
        table = storage.read_parquet(url)
        assert table.schema.equals(schemas.DROP_COUNTS)
        for row in table.to_pylist():
            assert row["stage"] == "metadata" and row["count"] > 0
            key = (row["source"], row["reason"])
            counts[key] = counts.get(key, 0) + row["count"]
    return counts


def test_each_filter_drops_its_rows_under_the_first_reason(client, tmp_path):
    rows = [
        {"SAMPLE_ID": 1},
        {"SAMPLE_ID": 2, "URL": None},
        {"SAMPLE_ID": 3, "URL": ""},
        {"SAMPLE_ID": 4, "TEXT": None},
        {"SAMPLE_ID": 5, "NSFW": "NSFW"},  # not in the ID list (first), and NSFW
        {"SAMPLE_ID": 6},  # excluded by ID
        {"SAMPLE_ID": 7, "URL": "https://opted-out.example.org/7.jpg"},  # excluded by URL
        {"SAMPLE_ID": 8, "URL": "ftp://img.example.com/8.jpg"},
        {"SAMPLE_ID": 9, "URL": "HTTPS://img.example.com/9.jpg"},  # schemes: any case
        {"SAMPLE_ID": 10, "URL": "http://img.Blocked.example/10.jpg"},
        {"SAMPLE_ID": 11, "URL": "http://user@BLOCKED.example:8080/11.jpg"},
        {"SAMPLE_ID": 12, "URL": "http://notblocked.example/12.jpg"},  # not a subdomain
        {"SAMPLE_ID": 13, "NSFW": "NSFW", "URL": "https://img.example.com/shared.jpg"},
        {"SAMPLE_ID": 14, "NSFW": None},
        {"SAMPLE_ID": 15, "NSFW": "unlikely"},  # allowed values: any case
        {"SAMPLE_ID": 16, "similarity": 0.29},
        {"SAMPLE_ID": 17, "similarity": None},
        {"SAMPLE_ID": 18, "WIDTH": 50, "HEIGHT": 600},
        {"SAMPLE_ID": 19, "WIDTH": 600, "HEIGHT": 50},  # swapped: still the short side
        {"SAMPLE_ID": 20, "WIDTH": 6000, "HEIGHT": 600},
        {"SAMPLE_ID": 21, "WIDTH": 900, "HEIGHT": 200},  # 4.5:1
        {"SAMPLE_ID": 22, "WIDTH": 0, "HEIGHT": 0},
        {"SAMPLE_ID": 23, "TEXT": "ab"},
        {"SAMPLE_ID": 24, "TEXT": "é" * 51},
        {"SAMPLE_ID": 25, "TEXT": "é" * 50},  # 50 characters, 100 bytes: kept
        {"SAMPLE_ID": 26, "URL": "https://img.example.com/1.jpg"},  # row 1's URL
        # Row 13 (dropped by nsfw) has this URL: only rows that pass the filters claim a URL.
        {"SAMPLE_ID": 27, "URL": "https://img.example.com/shared.jpg"},
        {"SAMPLE_ID": 28, "HEIGHT": None},
        {"SAMPLE_ID": 29, "similarity": float("nan")},  # NaN is not >= anything
    ]
    source = write_input(tmp_path / "part.parquet", rows)
    (tmp_path / "ids.txt").write_text(
        "# LAION-Face style ID list\n"
        + "\n".join(str(r["SAMPLE_ID"]) for r in rows if r["SAMPLE_ID"] != 5)
    )
    (tmp_path / "optout.txt").write_text("6\n\nhttps://opted-out.example.org/7.jpg\n")
    ctx = run_stage(
        client,
        {
            "input": source,
            "id_list": str(tmp_path / "ids.txt"),
            "exclude_list": str(tmp_path / "optout.txt"),
            "blocked_domains": ["blocked.example"],
            "nsfw": ["UNLIKELY"],
            "min_similarity": 0.3,
            "min_side": 100,
            "max_side": 5000,
            "max_aspect_ratio": 3.0,
            "min_caption_chars": 3,
            "max_caption_chars": 50,
        },
    )
    assert shard_rows(ctx).column("SAMPLE_ID").to_pylist() == [1, 9, 12, 15, 25, 27]
    assert drop_counts(ctx) == {
        (source, "null_url"): 2,
        (source, "null_caption"): 1,
        (source, "id_list"): 1,
        (source, "exclude_list"): 2,
        (source, "url_scheme"): 1,
        (source, "blocked_domain"): 2,
        (source, "nsfw"): 2,
        (source, "min_similarity"): 3,
        (source, "min_side"): 4,
        (source, "max_side"): 1,
        (source, "max_aspect_ratio"): 1,
        (source, "min_caption_chars"): 1,
        (source, "max_caption_chars"): 1,
        (source, "duplicate_url"): 1,
    }
    summary = storage.read_json(ctx.path("metadata", "summary.json"))
    assert summary["input_rows"] == 29 and summary["kept_rows"] == 6
    assert summary["reasons"] == list(METADATA_REASONS)


def _reference(files: list[list[dict]], ids: set[int], settings: dict) -> tuple[list, dict]:
    """The selection spelled out row by row in Python: kept SAMPLE_IDs, drops per (file, reason)."""
    kept, drops, seen = [], {}, set()
    for index, rows in enumerate(files):
        for row in rows:
            short = min(row["WIDTH"], row["HEIGHT"])
            reason = next(
                (
                    name
                    for name, fails in (
                        ("null_url", not row["URL"]),
                        ("id_list", row["SAMPLE_ID"] not in ids),
                        ("nsfw", row["NSFW"] not in settings["nsfw"]),
                        ("min_similarity", row["similarity"] < settings["min_similarity"]),
                        ("min_side", short < settings["min_side"]),
                        ("duplicate_url", row["URL"] in seen),
                    )
                    if fails
                ),
                None,
            )
            if reason is None:
                seen.add(row["URL"])
                kept.append(row["SAMPLE_ID"])
            else:
                drops[(index, reason)] = drops.get((index, reason), 0) + 1
    return kept, drops


def test_conservation_per_file_with_split_row_groups_and_hash_buckets(
    client, tmp_path, monkeypatch
):
    # Small tasks and buckets, so the same code paths run as on LAION's 13M-row parts.
    monkeypatch.setattr(metadata_stage, "TASK_ROWS", 300)
    monkeypatch.setattr(filters, "READ_BATCH_ROWS", 128)
    monkeypatch.setattr(metadata_stage, "DEDUP_BUCKET_ROWS", 400)
    monkeypatch.setattr(metadata_stage, "SHARD_TASK_ROWS", 150)
    rng = np.random.default_rng(7)
    urls = [f"http://img{k % 40}.example.net/{k}.jpg" for k in range(700)]  # ~1/3 repeats
    files = []
    for f, n in enumerate((1000, 700, 1)):
        files.append(
            [
                {
                    "SAMPLE_ID": f * 10_000 + i,
                    "URL": urls[int(rng.integers(0, len(urls)))] if rng.random() > 0.02 else None,
                    "TEXT": "caption",
                    "HEIGHT": int(rng.integers(10, 300)),
                    "WIDTH": int(rng.integers(10, 300)),
                    "LICENSE": "?",
                    "NSFW": str(rng.choice(["UNLIKELY", "UNSURE", "NSFW"])),
                    "similarity": float(rng.uniform(0.25, 0.4)),
                }
                for i in range(n)
            ]
        )
    sources = [
        write_input(tmp_path / f"part-{f}.parquet", rows, row_group_size=rg)
        for f, (rows, rg) in enumerate(zip(files, (128, 700, None), strict=True))
    ]
    all_ids = [r["SAMPLE_ID"] for rows in files for r in rows]
    chosen = {i for i in all_ids if rng.random() < 0.6}
    np.save(tmp_path / "ids.npy", np.array(sorted(chosen) + [99_999_999], dtype=np.int64))
    settings = {"nsfw": ["UNLIKELY", "UNSURE"], "min_similarity": 0.3, "min_side": 50}
    ctx = run_stage(
        client,
        {
            "input": [str(tmp_path / "part-*.parquet")],
            "id_list": str(tmp_path / "ids.npy"),
            "rows_per_shard": 97,
            **settings,
        },
    )
    stats = storage.read_json(ctx.path("run.json"))["stages"]
    assert stats["metadata/parts"]["shards_total"] > len(sources)  # files were split
    assert stats["metadata/dupes"]["shards_total"] > 1  # several hash buckets

    expected_kept, expected_drops = _reference(files, chosen, settings)
    out = shard_rows(ctx)
    assert out.column("SAMPLE_ID").to_pylist() == expected_kept
    counts = drop_counts(ctx)
    assert counts == {(sources[f], reason): n for (f, reason), n in expected_drops.items()}
    inputs = storage.read_parquet(ctx.path("metadata", "inputs.parquet")).to_pylist()
    assert [row["source"] for row in inputs] == sources
    for row, rows in zip(inputs, files, strict=True):
        dropped = sum(n for (source, _), n in counts.items() if source == row["source"])
        kept = pc.sum(pc.equal(out.column("source_file"), row["source"])).as_py() or 0
        assert row["input_rows"] == len(rows) == row["kept_rows"] + dropped
        assert row["kept_rows"] == kept and row["dropped_rows"] == dropped
    # source_file and source_row lead back to the very row.
    for source, index, sample_id in itertools.islice(
        zip(
            out["source_file"].to_pylist(),
            out["source_row"].to_pylist(),
            out["SAMPLE_ID"].to_pylist(),
            strict=True,
        ),
        0,
        None,
        37,
    ):
        assert files[sources.index(source)][index]["SAMPLE_ID"] == sample_id


def test_laion_face_id_list_selects_exactly_its_rows(tmp_path):
    """LAION-Face's laion_face_ids.pth layout, through `laionface run` with worker processes."""
    rows = [
        {
            "SAMPLE_ID": 1000 + i,
            "URL": f"http://cdn{i % 7}.example.com/{i}.jpg",
            "TEXT": f"caption {i}",
            "HEIGHT": 100 + i,
            "WIDTH": 300 - i,
            "LICENSE": "?" if i % 5 else "https://creativecommons.org/licenses/by/4.0/",
            "NSFW": ["UNLIKELY", "UNSURE", "NSFW"][i % 3],
            "similarity": 0.3 + i / 1000,
        }
        for i in range(120)
    ]
    source = write_input(tmp_path / "part-00000.parquet", rows, row_group_size=50)
    # 32 collections, one per LAION-400M part, in every form such a file may hold; IDs of other
    # parts (not in this file) select nothing.
    parts = [[5_000_000 + p] for p in range(32)]
    parts[0] = [1003, 1010, 1011, 1050, 1051, 1119]
    parts[1] = {1000, 1064}
    parts[2] = torch.tensor([1002, 1099], dtype=torch.int64)
    parts[3] = np.array([1100, 1101], dtype=np.int64)
    parts[4] = (1020,)
    torch.save(parts, tmp_path / "laion_face_ids.pth")
    selected = {1003, 1010, 1011, 1050, 1051, 1119, 1000, 1064, 1002, 1099, 1100, 1101, 1020}

    config = parse_config(
        {
            "metadata": {"input": source, "id_list": str(tmp_path / "laion_face_ids.pth")},
            "cluster": {"workers": 2, "retries": 0, "dashboard_address": ""},
        }
    )
    run = run_pipeline(config, run_dir=str(tmp_path / "run"), stages="metadata", progress=False)
    shards = storage.list_files(run.path("metadata", "shards"), ".parquet")
    out = pa.concat_tables([storage.read_parquet(s) for s in shards])
    assert out.schema.equals(schemas.DOWNLOAD_SHARD)
    expected = [r for r in rows if r["SAMPLE_ID"] in selected]  # in file order
    assert out.select(schemas.LAION_METADATA.names).to_pylist() == expected
    assert out.column("source_file").to_pylist() == [source] * len(expected)
    assert out.column("source_row").to_pylist() == [r["SAMPLE_ID"] - 1000 for r in expected]
    assert storage.read_json(run.path("run.json"))["stages"]["metadata"]["status"] == "done"


@pytest.mark.parametrize("layout", ["npy", "parquet-ids", "parquet-urls", "txt-mixed", "pth-urls"])
def test_id_list_layouts(client, tmp_path, layout):
    rows = [{"SAMPLE_ID": i} for i in range(1, 11)]
    source = write_input(tmp_path / "in.parquet", rows)
    wanted = [2, 3, 7]
    url_of = {i: f"https://img.example.com/{i}.jpg" for i in wanted}
    if layout == "npy":
        path = tmp_path / "ids.npy"
        np.save(path, np.array(wanted, dtype=np.int32))
    elif layout == "parquet-ids":
        path = tmp_path / "ids.parquet"
        pq.write_table(pa.table({"SAMPLE_ID": wanted, "other": ["a", "b", "c"]}), path)
    elif layout == "parquet-urls":
        path = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [url_of[i] for i in wanted]}), path)
    elif layout == "txt-mixed":
        path = tmp_path / "list.txt"
        path.write_text(f"2\n  {url_of[3]}  \n# comment\n7\n")
    else:
        path = tmp_path / "urls.pth"
        torch.save([url_of[i] for i in wanted], path)
    ctx = run_stage(client, {"input": source, "id_list": str(path)})
    assert shard_rows(ctx).column("SAMPLE_ID").to_pylist() == wanted
    # The same list as opt-outs drops exactly those rows.
    ctx = run_stage(client, {"input": source, "exclude_list": str(path)})
    assert shard_rows(ctx).column("SAMPLE_ID").to_pylist() == [1, 4, 5, 6, 8, 9, 10]


def test_shards_are_full_numbered_in_input_order_and_follow_rows_per_shard(
    client, tmp_path, monkeypatch
):
    monkeypatch.setattr(metadata_stage, "TASK_ROWS", 6)
    monkeypatch.setattr(metadata_stage, "SHARD_TASK_ROWS", 10)
    first = write_input(tmp_path / "b.parquet", [{"SAMPLE_ID": i} for i in range(23)], 4)
    second = write_input(tmp_path / "a.parquet", [{"SAMPLE_ID": 100 + i} for i in range(14)], 5)
    run_url = f"memory://metadata-tests/{uuid.uuid4().hex}"
    settings = {"input": [first, second], "rows_per_shard": 5}  # config order, not name order

    ctx = run_stage(client, settings, run_url)
    names = [Path(u).name for u in storage.list_files(ctx.path("metadata", "shards"), ".parquet")]
    assert names == [f"{n:05d}.parquet" for n in range(8)]
    sizes = [storage.read_parquet(ctx.path("metadata", "shards", n)).num_rows for n in names]
    assert sizes == [5] * 7 + [2]
    expected = list(range(23)) + [100 + i for i in range(14)]
    assert shard_rows(ctx).column("SAMPLE_ID").to_pylist() == expected

    # The same command again redoes nothing.
    ctx = run_stage(client, settings, run_url)
    stages = storage.read_json(ctx.path("run.json"))["stages"]
    for step in ("metadata/parts", "metadata/dupes", "metadata/shards"):
        assert stages[step]["shards_skipped"] == stages[step]["shards_total"]

    # Fewer, larger shards: the old shards past the new count are gone.
    ctx = run_stage(client, {**settings, "rows_per_shard": 10}, run_url)
    sizes = [
        storage.read_parquet(u).num_rows
        for u in storage.list_files(ctx.path("metadata", "shards"), ".parquet")
    ]
    assert sizes == [10, 10, 10, 7]
    assert shard_rows(ctx).column("SAMPLE_ID").to_pylist() == expected


def test_other_column_names_and_absent_columns(client, tmp_path):
    """DataComp-style metadata: other names, float sizes, no SAMPLE_ID, NSFW or LICENSE."""
    table = pa.table(
        {
            "url": [
                "https://a.example/1.jpg",
                "https://a.example/2.jpg",
                "https://a.example/3.jpg",
            ],
            "text": ["one", "two", "three"],
            "original_width": [640.0, 20.0, float("nan")],
            "original_height": pa.array([480, 480, 480], pa.int64()),
            "clip_score": pa.array([0.31, 0.35, 0.4], pa.float32()),
        }
    )
    pq.write_table(table, tmp_path / "datacomp.parquet")
    columns = {
        "sample_id": "",
        "url": "url",
        "text": "text",
        "width": "original_width",
        "height": "original_height",
        "license": "",
        "nsfw": "",
        "similarity": "clip_score",
    }
    ctx = run_stage(
        client,
        {"input": str(tmp_path / "datacomp.parquet"), "columns": columns, "min_side": 100},
    )
    out = shard_rows(ctx)
    assert out.schema.equals(schemas.DOWNLOAD_SHARD)
    assert out.to_pylist()[0] | {"source_file": None} == {
        "SAMPLE_ID": None,
        "URL": "https://a.example/1.jpg",
        "TEXT": "one",
        "HEIGHT": 480,
        "WIDTH": 640,
        "LICENSE": None,
        "NSFW": None,
        "similarity": pytest.approx(0.31),
        "source_file": None,
        "source_row": 0,
    }
    assert out.num_rows == 1  # width 20 and the NaN width fail min_side
    assert drop_counts(ctx) == {(str(tmp_path / "datacomp.parquet"), "min_side"): 2}


def test_missing_column_names_file_column_and_existing_columns(client, tmp_path):
    table = laion_table([{"SAMPLE_ID": 1}]).drop_columns(["NSFW"])
    pq.write_table(table, tmp_path / "no-nsfw.parquet")
    with pytest.raises(MetadataError) as error:
        run_stage(client, {"input": str(tmp_path / "no-nsfw.parquet")})
    message = str(error.value)
    assert str(tmp_path / "no-nsfw.parquet") in message
    assert "'NSFW'" in message and "metadata.columns.nsfw" in message
    assert "SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, similarity" in message


def test_wrong_column_type_is_named(client, tmp_path):
    table = laion_table([{"SAMPLE_ID": 1}]).set_column(0, "SAMPLE_ID", pa.array(["abc"]))
    pq.write_table(table, tmp_path / "hex-ids.parquet")
    with pytest.raises(MetadataError, match=r"hex-ids\.parquet: column 'SAMPLE_ID'.*integer"):
        run_stage(client, {"input": str(tmp_path / "hex-ids.parquet")})


def test_not_parquet_and_truncated_files_are_named(client, tmp_path):
    good = write_input(tmp_path / "good.parquet", [{"SAMPLE_ID": i} for i in range(50)])
    (tmp_path / "notes.parquet").write_text("SAMPLE_ID,URL\n1,http://x\n")
    data = Path(good).read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    for name in ("notes.parquet", "cut.parquet"):
        with pytest.raises(MetadataError, match="not a readable parquet file") as error:
            run_stage(client, {"input": [good, str(tmp_path / name)]})
        assert str(tmp_path / name) in str(error.value)
    with pytest.raises(MetadataError, match="does not exist"):
        run_stage(client, {"input": str(tmp_path / "missing.parquet")})
    with pytest.raises(MetadataError, match="matches no parquet files"):
        run_stage(client, {"input": str(tmp_path / "nothing-*.parquet")})


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("ids.pth", lambda p: torch.save({1: [(0, 0, 1, 1)]}, p)),  # sample2detect's dict
        ("ids.pth", lambda p: torch.save([[1, 2], [[3]]], p)),  # nested too deep
        ("ids.pth", lambda p: torch.save(torch.tensor([0.5, 1.5]), p)),
        ("ids.npy", lambda p: np.save(p, np.array([0.5, 1.5]))),
        ("ids.parquet", lambda p: pq.write_table(pa.table({"a": [1], "b": [2]}), p)),
        ("ids.csv", lambda p: p.write_text("1\n2\n")),
    ],
)
def test_unknown_id_list_layout_says_which_layouts_are_read(client, tmp_path, name, write):
    source = write_input(tmp_path / "in.parquet", [{"SAMPLE_ID": 1}])
    write(tmp_path / name)
    with pytest.raises(IdListError) as error:
        run_stage(client, {"input": source, "id_list": str(tmp_path / name)})
    message = str(error.value)
    assert str(tmp_path / name) in message and "unknown ID list layout" in message
    assert idlists.LAYOUTS in message


def test_pickled_code_in_an_id_list_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save([Payload()], tmp_path / "evil.pth")
    with pytest.raises(IdListError, match="weights_only"):
        idlists.read_list(str(tmp_path / "evil.pth"))


def test_config_refuses_filters_on_absent_columns():
    with pytest.raises(ValueError, match="columns.nsfw can't be empty"):
        parse_config({"metadata": {"nsfw": ["UNLIKELY"], "columns": {"nsfw": ""}}})
    with pytest.raises(ValueError, match="min_side .* is above max_side"):
        parse_config({"metadata": {"min_side": 500, "max_side": 100}})


def test_turning_dedup_off_keeps_repeated_urls_and_drops_their_counts(client, tmp_path):
    rows = [{"SAMPLE_ID": i, "URL": f"https://img.example.com/{i % 3}.jpg"} for i in range(7)]
    source = write_input(tmp_path / "in.parquet", rows)
    run_url = f"memory://metadata-tests/{uuid.uuid4().hex}"
    ctx = run_stage(client, {"input": source}, run_url)
    assert shard_rows(ctx).column("SAMPLE_ID").to_pylist() == [0, 1, 2]
    assert drop_counts(ctx) == {(source, "duplicate_url"): 4}

    ctx = run_stage(client, {"input": source, "dedup_urls": False}, run_url)
    assert shard_rows(ctx).column("SAMPLE_ID").to_pylist() == list(range(7))
    assert drop_counts(ctx) == {}
    for folder in ("urlhash", "dupes"):
        assert storage.list_files(ctx.path("metadata", folder), ".parquet") == []
    inputs = storage.read_parquet(ctx.path("metadata", "inputs.parquet")).to_pylist()
    assert inputs == [{"source": source, "input_rows": 7, "kept_rows": 7, "dropped_rows": 0}]


def test_inputs_on_an_object_store_are_read_in_place(client, tmp_path, s3_server):
    """Input parquet and the ID list on S3 (a real S3 server on 127.0.0.1), read through fsspec."""
    rows = [{"SAMPLE_ID": i, "NSFW": "NSFW" if i == 4 else "UNLIKELY"} for i in range(10)]
    local = write_input(tmp_path / "part.parquet", rows, row_group_size=4)
    fs = fsspec.filesystem("s3")
    fs.put(local, f"{S3_BUCKET}/laion/part-00000.parquet")
    fs.pipe(f"{S3_BUCKET}/laion/ids.txt", b"1\n2\n4\n8\n")
    source = f"s3://{S3_BUCKET}/laion/part-00000.parquet"
    ctx = run_stage(
        client,
        {
            "input": [f"s3://{S3_BUCKET}/laion/"],
            "id_list": f"s3://{S3_BUCKET}/laion/ids.txt",
            "nsfw": ["UNLIKELY"],
        },
    )
    out = shard_rows(ctx)
    assert out.column("SAMPLE_ID").to_pylist() == [1, 2, 8]
    assert out.column("source_file").to_pylist() == [source] * 3
    assert drop_counts(ctx) == {(source, "id_list"): 6, (source, "nsfw"): 1}
