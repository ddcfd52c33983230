"""The metadata that can be downloaded today: each source's pipeline (its metadata.columns) reads a
small generated table with that source's documented schema through the real metadata stage;
and the license, NSFW-score and watermark filters, each counted under its own reason."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionface.config import Config, ConfigError, load_config, parse_config
from laionface.engine.cluster import open_client
from laionface.engine.pipeline import stage_of
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext
from laionface.io import storage
from laionface.stages.metadata.inputs import MetadataError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
STAGE = stage_of("metadata")

# Each source's columns and types, as its public documentation gives them (see README's table
# of sources): Re-LAION from public code reading its parquet parts (the repository is gated and
# has no card), DataComp from its Hugging Face viewer and repository, COYO from its card.
RELAION = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("similarity", pa.float64()),
    ]
)
DATACOMP = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("clip_b32_similarity_score", pa.float32()),
        ("clip_l14_similarity_score", pa.float32()),
        ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
        ("sha256", pa.string()),
    ]
)
COYO = pa.schema(
    [("id", pa.int64()), ("url", pa.string()), ("text", pa.string())]
    + [("width", pa.int32()), ("height", pa.int32()), ("image_phash", pa.string())]
    + [(n, pa.int32()) for n in ("text_length", "word_count", "num_tokens_bert")]
    + [("num_tokens_gpt", pa.int32()), ("num_faces", pa.int32())]
    + [
        (n, pa.float32())
        for n in (
            "clip_similarity_vitb32",
            "clip_similarity_vitl14",
            "nsfw_score_opennsfw2",
            "nsfw_score_gantman",
            "watermark_score",
            "aesthetic_score_laion_v2",
        )
    ]
)
PRESETS = {
    "relaion2b-en-research-safe": RELAION,
    "relaion2b-multi-research-safe": RELAION,
    "datacomp-1b": DATACOMP,
    "commonpool": DATACOMP,
    "coyo-700m": COYO,
}


@pytest.fixture(scope="module")
def client():
    """One Dask cluster for the module: memory:// run folders, so thread workers."""
    config = Config()
    config.cluster.dashboard_address = ""
    with open_client(config, "memory://preset-tests") as dask_client:
        yield dask_client
    fsspec.filesystem("memory").rm("/preset-tests", recursive=True)


def run_metadata(client, config: Config) -> dict:
    """The real metadata stage on `config`; returns metadata/summary.json and the shards' rows."""
    run = RunFolder(f"memory://preset-tests/{uuid.uuid4().hex}")
    run.start(config)
    ctx = StageContext(config, run, client, progress=False, stage=STAGE)
    STAGE.run(ctx)
    urls = storage.list_files(ctx.path("metadata", "shards"), ".parquet")
    rows = [r for url in urls for r in storage.read_parquet(url).to_pylist()]
    return {"summary": storage.read_json(ctx.layout.metadata_summary), "rows": rows}


def generic_row(schema: pa.Schema, i: int) -> dict:
    """A plausible row of `schema`: every column filled by its type."""
    values = {
        pa.string(): f"v{i}",
        pa.int64(): 1000 + i,
        pa.int32(): 300 + i,
        pa.float64(): 0.35,
        pa.float32(): 0.35,
    }
    return {f.name: values.get(f.type, []) for f in schema}


def preset_table(schema: pa.Schema, columns, floor: float | None) -> tuple[pa.Table, list[dict]]:
    """Eight rows of `schema` through the preset's `columns`, and what the shards must hold:
    a row with a null caption is dropped, one repeats a URL, one's similarity is under 0.3 (it
    goes where the preset has a `floor`)."""
    rows, expected = [], []
    for i in range(8):
        row = generic_row(schema, i)
        row[columns.url] = f"https://img.example.com/{i}.jpg"
        row[columns.text] = f"a face, number {i}"
        row[columns.width], row[columns.height] = 640 + i, 480 - i
        row[columns.similarity] = 0.31 + i / 100
        if i == 2:
            row[columns.similarity] = 0.1
        if i == 4:
            row[columns.text] = None
        if i == 7:
            row[columns.url] = "https://img.example.com/0.jpg"
        rows.append(row)
    for i, row in enumerate(rows):
        if i == 4 or i == 7 or (i == 2 and floor is not None):
            continue
        expected.append(
            {
                "SAMPLE_ID": row[columns.sample_id] if columns.sample_id else None,
                "URL": row[columns.url],
                "TEXT": row[columns.text],
                "WIDTH": row[columns.width],
                "HEIGHT": row[columns.height],
                "LICENSE": None,
                "NSFW": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema), expected


def preset_config(name: str, source: Path, *overrides: str) -> Config:
    return load_config(
        PIPELINES / f"{name}.toml",
        [
            f"metadata.input={json.dumps([str(source)])}",
            "cluster.dashboard_address=''",
            "cluster.retries=0",
            *overrides,
        ],
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_source_preset_reads_a_table_of_its_schema(name, client, tmp_path):
    pipeline = PIPELINES / f"{name}.toml"
    previous = ""
    for line in pipeline.read_text().splitlines():  # every key says what it is
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith(("#", '"')):
            assert "#" in stripped or previous.startswith("#"), f"{name}: {stripped}"
        previous = stripped
    section = load_config(pipeline).metadata
    table, expected = preset_table(PRESETS[name], section.columns, section.min_similarity)
    source = tmp_path / "part-00000.parquet"
    pq.write_table(table, source)
    out = run_metadata(client, preset_config(name, source))
    got = [{k: r[k] for k in expected[0]} for r in out["rows"]]
    assert got == expected
    similarity = {r["URL"]: r["similarity"] for r in out["rows"]}
    assert similarity["https://img.example.com/1.jpg"] == pytest.approx(0.32, abs=1e-6)
    dropped = {"null_caption": 1, "duplicate_url": 1}
    if section.min_similarity is not None:
        dropped["min_similarity"] = 1
    assert out["summary"]["dropped"] == dropped


def test_coyo_scores_filter_nsfw_and_watermarks(client, tmp_path):
    rows = []
    for i in range(6):
        row = generic_row(COYO, i)
        row.update(url=f"https://img.example.com/{i}.jpg", clip_similarity_vitb32=0.4)
        row.update(nsfw_score_opennsfw2=[0.01, 0.7, 0.2, 0.01, None, 0.3][i])
        row.update(watermark_score=[0.1, 0.95, 0.95, 0.9, 0.1, 0.79][i])
        rows.append(row)
    source = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=COYO), source)
    config = preset_config(
        "coyo-700m", source, "metadata.max_punsafe=0.5", "metadata.max_pwatermark=0.8"
    )
    out = run_metadata(client, config)
    assert [r["SAMPLE_ID"] for r in out["rows"]] == [1000, 1005]
    # Row 1 fails both (counted once, under the first); a null score fails (row 4).
    assert out["summary"]["dropped"] == {"max_punsafe": 2, "max_pwatermark": 2}


def laion_rows() -> list[dict]:
    base = {"TEXT": "a face", "HEIGHT": 480, "WIDTH": 640, "NSFW": "UNLIKELY", "similarity": 0.35}
    cc_by = "https://creativecommons.org/licenses/by/4.0/"
    cases = [
        ("?", 0.1, 0.1),  # kept
        (cc_by, 0.1, 0.1),  # kept
        ("https://creativecommons.org/licenses/by-sa/4.0/", 0.1, 0.1),  # license
        (None, 0.1, 0.1),  # license: a null fails
        ("http://creativecommons.org/licenses/by/4.0/", 0.9, 0.1),  # license first
        ("?", 0.9, 0.1),  # max_punsafe
        ("?", float("nan"), 0.1),  # max_punsafe: NaN fails
        ("?", None, 0.1),  # max_punsafe: null fails
        ("?", 0.1, 0.85),  # max_pwatermark
        (cc_by, 0.5, 0.8),  # kept: the bounds are inclusive
    ]
    return [
        {
            **base,
            "SAMPLE_ID": i,
            "URL": f"https://img.example.com/{i}.jpg",
            "LICENSE": lic,
            "punsafe": unsafe,
            "pwatermark": mark,
        }
        for i, (lic, unsafe, mark) in enumerate(cases)
    ]


LAION_5B = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("HEIGHT", pa.int32()),
        ("WIDTH", pa.int32()),
        ("LICENSE", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
        ("punsafe", pa.float32()),
        ("pwatermark", pa.float32()),
    ]
)


def test_license_and_safety_filters_count_each_reason(client, tmp_path):
    source = tmp_path / "part.parquet"
    pq.write_table(pa.Table.from_pylist(laion_rows(), schema=LAION_5B), source)
    settings = {
        "input": [str(source)],
        "licenses": ["?", "https://creativecommons.org/licenses/by/4.0/"],
        "max_punsafe": 0.5,
        "max_pwatermark": 0.8,
        "columns": {"punsafe": "punsafe", "pwatermark": "pwatermark"},
    }
    config = parse_config({"metadata": settings, "cluster": {"retries": 0}})
    out = run_metadata(client, config)
    assert [r["SAMPLE_ID"] for r in out["rows"]] == [0, 1, 9]
    assert out["summary"]["dropped"] == {"license": 3, "max_punsafe": 3, "max_pwatermark": 1}
    assert "punsafe" not in out["rows"][0]  # read by the filter, not carried to the download


def test_score_filters_need_a_numeric_column(client, tmp_path):
    with pytest.raises(ConfigError, match=r"columns.punsafe can't be empty"):
        parse_config({"metadata": {"input": ["x.parquet"], "max_punsafe": 0.5}})
    with pytest.raises(ConfigError, match=r"columns.license can't be empty"):
        parse_config({"metadata": {"licenses": ["?"], "columns": {"license": ""}}})
    source = tmp_path / "part.parquet"
    rows = [{**r, "punsafe": str(r["punsafe"])} for r in laion_rows()]
    schema = LAION_5B.set(LAION_5B.get_field_index("punsafe"), pa.field("punsafe", pa.string()))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), source)
    settings = {"input": [str(source)], "max_punsafe": 0.5, "columns": {"punsafe": "punsafe"}}
    config = parse_config({"metadata": settings, "cluster": {"retries": 0}})
    with pytest.raises(
        MetadataError, match=r"column 'punsafe' \(metadata.columns.punsafe\) is string"
    ):
        run_metadata(client, config)
