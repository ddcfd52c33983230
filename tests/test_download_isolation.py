"""No single URL takes down more than itself: the 249 KB PNG declaring 8000 x 8000 RGBA pixels,
served on 127.0.0.1 to the download stage on a LocalCluster of process workers with
cluster.memory_limit = "2GB".

Under the pixel cap it is refused from its header (too_many_pixels) and the shard goes on. With
the cap raised out of the way it really kills its worker (img2dataset decodes it whole, past 5
GB), and the stage isolates it: the shard is downloaded again in halves down to that row, which
is recorded as worker_died, and the raw shard is complete with every other row downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile

import dask
import pyarrow as pa
import pytest

from laionface.config import Config
from laionface.demo.corpus import build_corpus
from laionface.engine.cluster import open_client
from laionface.engine.pipeline import run_stage, stage_of, worker_preload
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext
from laionface.io import storage
from laionface.io.schemas import DOWNLOAD_SHARD
from laionface.layout import RunLayout
from laionface.stages.download.outcomes import latest_outcomes
from tests.imageservers import CountingImageServer, png_bomb

BOMB = "bomb.png"
ROWS = 8
BOMB_ROW = 5


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """A corpus folder of seven good JPEGs of the demo corpus and the bomb, in row order."""
    demo = build_corpus(tmp_path_factory.getbasetemp() / "demo-corpus-seed0", seed=0)
    truth = demo.read_truth().to_pylist()
    good = sorted(r["file"] for r in truth if r["case"] == "ok" and r["format"] == "jpeg")
    folder = tmp_path_factory.getbasetemp() / "bomb-corpus" / "images"
    folder.mkdir(parents=True)
    for name in good[: ROWS - 1]:
        shutil.copy(demo.root / "images" / name, folder / name)
    (folder / BOMB).write_bytes(png_bomb(8000, 8000))
    names = good[: ROWS - 1]
    names.insert(BOMB_ROW, BOMB)
    return names


@pytest.fixture(scope="module")
def server(images, tmp_path_factory):
    with CountingImageServer(tmp_path_factory.getbasetemp() / "bomb-corpus") as running:
        yield running


@pytest.fixture()
def urls(server, images) -> list[str]:
    return [f"{server.base_url}/img/{name}" for name in images]


def _config(**download_settings) -> Config:
    config = Config()
    config.cluster.workers = 1
    config.cluster.threads_per_worker = 1
    config.cluster.memory_limit = "2GB"
    config.cluster.retries = 0  # each retry of a shard that kills would kill a worker again
    config.cluster.dashboard_address = ":0"
    config.metadata.rows_per_shard = 100
    config.download.allow_loopback = True
    config.download.thread_count = 4
    for key, value in download_settings.items():
        setattr(config.download, key, value)
    return config


def _start_run(url: str, config: Config, urls: list[str]) -> RunFolder:
    rows = [
        dict(
            SAMPLE_ID=100 + i,
            URL=u,
            TEXT=f"caption {i}",
            HEIGHT=100,
            WIDTH=100,
            LICENSE="?",
            NSFW="UNLIKELY",
            similarity=0.3,
            source_file="test",
            source_row=i,
        )
        for i, u in enumerate(urls)
    ]
    table = pa.Table.from_pylist(rows, schema=DOWNLOAD_SHARD)
    storage.write_parquet(table, storage.join(url, "metadata", "shards", "00000.parquet"))
    run = RunFolder(url)
    run.start(config)
    return run


def _download(run: RunFolder, config: Config) -> None:
    with open_client(config, run.url, preload=worker_preload(["download"])) as client:
        run_stage(StageContext(config, run, client, progress=False, stage=stage_of("download")))


def _tar_members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_pixel_cap_refuses_the_bomb_from_its_header_and_the_shard_goes_on(server, urls, tmp_path):
    server.reset()
    config = _config()  # download.max_image_pixels: 50,000,000 < 8000 x 8000
    run = _start_run(str(tmp_path / "run"), config, urls)

    _download(run, config)

    raw = storage.read_parquet(run.layout.raw_parquet("00000")).to_pylist()
    categories = [r["error_category"] for r in raw]
    assert categories == [None] * BOMB_ROW + ["too_many_pixels"] + [None] * (ROWS - BOMB_ROW - 1)
    assert "8000 x 8000" in raw[BOMB_ROW]["error_message"]
    # One attempt at one shard did it all: no worker died, nothing was isolated.
    assert server.request_count(f"/img/{BOMB}") == 1
    assert not storage.exists(run.layout.download_pieces)


def test_a_url_that_kills_its_worker_is_isolated_and_the_shard_completes(
    server, urls, tmp_path, caplog
):
    # The cap raised out of the way: img2dataset decodes the bomb whole, past the 2 GB limit.
    config = _config(max_image_pixels=100_000_000)
    url = str(tmp_path / "run")
    run = _start_run(url, config, urls)
    server.reset()

    # One death makes a task KilledWorker (Dask's default waits for 4, each a worker restart).
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        caplog.at_level(logging.WARNING, logger="laionface"),
    ):
        _download(run, config)

    layout = RunLayout(url)
    raw = storage.read_parquet(layout.raw_parquet("00000")).to_pylist()
    # Every input row, under img2dataset's key: shard digits and its index in the metadata shard.
    assert [r["key"] for r in raw] == [f"00000{i:04d}" for i in range(ROWS)]
    assert [r["url"] for r in raw] == urls
    assert [r["SAMPLE_ID"] for r in raw] == [100 + i for i in range(ROWS)]
    expected = [None] * BOMB_ROW + ["worker_died"] + [None] * (ROWS - BOMB_ROW - 1)
    assert [r["error_category"] for r in raw] == expected
    assert raw[BOMB_ROW]["error_message"].startswith("worker_died:")
    assert f"/img/{BOMB}" in caplog.text and "worker_died" in caplog.text

    # The tar holds each success under its shard key, its json saying the same key.
    members = _tar_members(layout.raw_tar("00000"))
    keys = [r["key"] for r in raw if r["status"] == "success"]
    assert sorted(members) == sorted(f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt"))
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        assert meta["key"] == key and meta["status"] == "success"
        assert members[f"{key}.txt"].decode() == f"caption {int(key[-4:])}"
    stats = storage.read_json(layout.raw_stats("00000"))
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (ROWS, ROWS - 1, 1)

    outcomes = latest_outcomes(url)
    assert outcomes["error_category"].to_pylist() == expected
    record = storage.read_json(layout.run_json)["stages"]["download"]
    assert record["status"] == "done"
    assert record["outcomes"]["by_category"] == {"worker_died": 1}
    # The pieces are gone once the shard is made; a re-run has nothing left to fetch.
    assert not storage.exists(layout.download_pieces)
    before = server.requests
    _download(run, config)
    assert server.requests == before
