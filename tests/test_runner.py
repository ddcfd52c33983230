"""The stage runner: resume, retries, recorded failures, atomic outputs, local and memory:// runs."""

from __future__ import annotations

import os
import time

import fsspec
import pytest

from laionface.config import Config
from laionface.engine.cluster import open_client
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import ShardTask, StageContext, StageFailed
from laionface.io import storage
from tests import shardfns


@pytest.fixture(params=["local", "memory"])
def run_ctx(request, tmp_path):
    """A run folder with a real LocalCluster (process workers locally, threads for memory://)."""
    if request.param == "local":
        url = str(tmp_path / "run")
    else:
        url = f"memory://runner-test-{os.getpid()}-{tmp_path.name}"
    config = Config()
    config.cluster.retries = 1
    config.cluster.dashboard_address = ""
    run = RunFolder(url)
    run.start(config)
    with open_client(config, url) as client:
        yield StageContext(config, run, client, progress=False)
    if request.param == "memory":
        fsspec.filesystem("memory").rm(url.split("://")[1], recursive=True)


def _tasks(ctx, fail_flag="", count_dir=""):
    return [
        ShardTask(
            f"{i:05d}",
            dict(
                out_url=ctx.path("toy", f"{i:05d}.json"),
                value=i,
                fail_flag=fail_flag if i == 3 else "",
                count_dir=count_dir,
            ),
        )
        for i in range(6)
    ]


def _modified(url: str) -> float:
    fs, path = storage.fs_for(url)
    info = fs.info(path)
    return info.get("mtime") or info.get("created")


def test_failed_shard_is_named_and_only_it_is_redone(run_ctx):
    ctx = run_ctx
    fail_flag = ctx.path("fail-shard-3")
    count_dir = ctx.path("calls")
    storage.write_bytes(fail_flag, b"")

    with pytest.raises(StageFailed) as failed:
        ctx.map_shards("toy", shardfns.write_value, _tasks(ctx, fail_flag, count_dir), settings="a")
    assert set(failed.value.failures) == {"00003"}
    assert "00003" in str(failed.value) and "planted failure" in str(failed.value)
    # The other shards finished and the failure is recorded in run.json.
    status = storage.read_json(ctx.path("run.json"))["stages"]["toy"]
    assert status["status"] == "failed" and list(status["failed"]) == ["00003"]
    assert status["shards_done"] == 5
    assert not storage.exists(ctx.path("toy", "00003.json"))
    before = {i: _modified(ctx.path("toy", f"{i:05d}.json")) for i in range(6) if i != 3}
    calls_before = len(storage.list_files(count_dir))
    # retries=1: the failing shard ran twice, each other shard once.
    assert calls_before == 5 + 2

    storage.remove(fail_flag)
    stats = ctx.map_shards(
        "toy", shardfns.write_value, _tasks(ctx, fail_flag, count_dir), settings="a"
    )

    assert sorted(stats) == [f"{i:05d}" for i in range(6)]
    assert storage.read_json(ctx.path("toy", "00003.json")) == {"value": 3}
    # Only shard 3 ran again: one more call, and no other output was rewritten.
    assert len(storage.list_files(count_dir)) == calls_before + 1
    assert {i: _modified(ctx.path("toy", f"{i:05d}.json")) for i in before} == before
    assert storage.read_json(ctx.path("run.json"))["stages"]["toy"]["status"] == "done"


def test_changed_fingerprint_redoes_every_shard(run_ctx):
    ctx = run_ctx
    count_dir = ctx.path("calls")
    ctx.map_shards("toy", shardfns.write_value, _tasks(ctx, count_dir=count_dir), settings="a")
    ctx.map_shards("toy", shardfns.write_value, _tasks(ctx, count_dir=count_dir), settings="a")
    assert len(storage.list_files(count_dir)) == 6
    ctx.map_shards("toy", shardfns.write_value, _tasks(ctx, count_dir=count_dir), settings="b")
    assert len(storage.list_files(count_dir)) == 12


def test_transient_failure_is_retried_within_the_run(run_ctx):
    ctx = run_ctx
    task = ShardTask(
        "00000",
        dict(out_url=ctx.path("flaky", "00000.json"), attempts_dir=ctx.path("attempts")),
    )
    stats = ctx.map_shards("flaky", shardfns.fail_first_then_write, [task], settings="x")
    assert stats["00000"]["items"] == 1
    assert storage.read_json(ctx.path("flaky", "00000.json")) == {"ok": True}


def test_crash_mid_write_leaves_nothing_partial(run_ctx):
    ctx = run_ctx
    out = ctx.path("crash", "00000.bin")
    task = ShardTask("00000", dict(out_url=out))
    with pytest.raises(StageFailed):
        ctx.map_shards("crash", shardfns.write_then_crash, [task], settings="x")
    assert not storage.exists(out)
    fs, path = storage.fs_for(ctx.path("crash"))
    leftovers = fs.ls(path, detail=False) if fs.exists(path) else []
    assert [p for p in leftovers if not p.endswith("_done")] == []
    assert not storage.exists(ctx.path("crash", "_done", "00000.json"))


def test_atomic_open_in_process(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(ValueError):
        with storage.atomic_open(str(target)) as handle:
            handle.write(b"partial")
            raise ValueError("interrupted")
    assert list(tmp_path.iterdir()) == []
    storage.write_bytes(str(target), b"whole")
    assert target.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_run_json_records_config_and_versions(tmp_path):
    config = Config()
    config.faces.batch_size = 7
    run = RunFolder(str(tmp_path / "r"))
    run.start(config)
    saved = storage.read_json(str(tmp_path / "r" / "run.json"))
    assert saved["config"]["faces"]["batch_size"] == 7
    assert {"python", "dask", "pyarrow", "torch"} <= set(saved["versions"])
    assert storage.read_json(str(tmp_path / "r" / "config.json"))["faces"]["batch_size"] == 7


@pytest.mark.parametrize("how", ["gil", "stop"])
def test_a_wedged_shard_is_restarted_and_the_run_finishes(tmp_path, how, caplog):
    """A task blocked in C holding the GIL, or whose worker is stopped, never returns and its
    worker answers nothing: the watchdog restarts the worker and the shard is retried."""
    url = str(tmp_path / "run")
    config = Config()
    config.cluster.dashboard_address = ""
    config.cluster.task_timeout = 4.0
    run = RunFolder(url)
    run.start(config)
    wedged = ShardTask(
        "00000",
        dict(out_url=storage.join(url, "out", "00000.json"), attempts_dir=str(tmp_path), how=how),
    )
    others = [
        ShardTask(f"{i:05d}", dict(out_url=storage.join(url, "out", f"{i:05d}.json"), value=i))
        for i in range(1, 4)
    ]
    with open_client(config, url) as client:
        ctx = StageContext(config, run, client, progress=False)
        started = time.monotonic()
        ctx.map_shards("wedged", shardfns.wedge_first_then_write, [wedged], settings="w")
        ctx.map_shards("others", shardfns.write_value, others, settings="w")
        elapsed = time.monotonic() - started
    assert storage.read_json(storage.join(url, "out", "00000.json")) == {"ok": True}
    assert sorted(p.name for p in (tmp_path / "run" / "out").iterdir()) == [
        f"{i:05d}.json" for i in range(4)
    ]
    assert "past its deadline" in caplog.text
    # The deadline, a worker restart and the retry; never the task's own hour.
    assert elapsed < 4.0 + 60
