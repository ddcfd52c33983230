"""One writer per run folder: two `laionface run` on one folder, stale and abandoned leases."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from laionface.dataset.publish import publish
from laionface.dataset.verify import verify
from laionface.demo.corpus import DEMO_HOST
from laionface.demo.imageserver import ImageServer
from laionface.engine import lease as lease_module
from laionface.engine.lease import Lease, LeaseHeld, holding
from laionface.io import storage
from tests import datasetrun

REPO = Path(__file__).resolve().parents[1]


def write_lease(folder: Path, **fields) -> None:
    base = {
        "token": "someone-else",
        "host": "gpu-node-7",
        "pid": 4242,
        "command": "laionface run",
        "started": "2026-11-30T10:00:00+00:00",
        "heartbeat": time.time(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lease.json").write_text(json.dumps({**base, **fields}))


def test_a_held_lease_names_its_holder(tmp_path):
    write_lease(tmp_path / "run")
    with pytest.raises(LeaseHeld, match=r"laionface run on gpu-node-7 \(pid 4242") as refused:
        Lease(str(tmp_path / "run"), "laionface run").acquire()
    assert "wait for it to finish" in str(refused.value)
    with pytest.raises(LeaseHeld):  # --force does not take a live lease
        Lease(str(tmp_path / "run"), "laionface run").acquire(force=True)


def test_a_stale_lease_is_taken_over_only_with_force(tmp_path):
    write_lease(tmp_path / "run", heartbeat=time.time() - lease_module.STALE_SECONDS - 60)
    with pytest.raises(LeaseHeld, match="stale .* pass --force"):
        Lease(str(tmp_path / "run"), "laionface run").acquire()
    with holding(str(tmp_path / "run"), "laionface run", force=True) as mine:
        on_disk = json.loads((tmp_path / "run" / "lease.json").read_text())
        assert on_disk["token"] == mine.state["token"] and on_disk["host"] == socket.gethostname()
    assert not (tmp_path / "run" / "lease.json").exists()  # given back


def test_a_lease_of_a_dead_process_of_this_host_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    write_lease(tmp_path / "run", host=socket.gethostname(), pid=int(dead.stdout))
    with holding(str(tmp_path / "run"), "laionface run"):
        pass


def test_the_heartbeat_keeps_a_long_command_s_lease_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_SECONDS", 0.2)
    with holding(str(tmp_path / "run"), "laionface run"):
        first = json.loads((tmp_path / "run" / "lease.json").read_text())["heartbeat"]
        time.sleep(1.0)
        later = json.loads((tmp_path / "run" / "lease.json").read_text())["heartbeat"]
    assert later > first


def test_on_an_object_store_too(s3_server):
    folder = "s3://laion-face/run"
    with holding(folder, "laionface run"):
        assert storage.exists(f"{folder}/lease.json")
        with pytest.raises(LeaseHeld, match="being written by laionface run"):
            Lease(folder, "laionface run").acquire()
    assert not storage.exists(f"{folder}/lease.json")


def test_two_runs_on_one_folder_the_second_stops_naming_the_first(tmp_path, demo_corpus):
    with ImageServer(demo_corpus.root) as server:
        command = [sys.executable, "-m", "laionface", "run", str(REPO / "pipelines" / "demo.toml")]
        command += ["--run-dir", str(tmp_path / "run"), "--no-progress"]
        for setting in (
            f"metadata.input={json.dumps([str(demo_corpus.metadata_path)])}",
            f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}',
            "cluster.dashboard_address=''",
        ):
            command += ["--set", setting]
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "lease.json").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1
    assert f"pid {first.pid}" in second.stderr and "being written by laionface run" in second.stderr
    # The second wrote nothing: one command's log, and the lease given back.
    assert len(list((tmp_path / "run" / "logs").iterdir())) == 1
    assert not (tmp_path / "run" / "lease.json").exists()


def test_publish_holds_the_target_s_lease(tmp_path_factory, shared_faces, tmp_path):
    built = datasetrun.built_run(tmp_path_factory, shared_faces)
    target = tmp_path / "published"
    write_lease(target, command="laionface publish")
    with pytest.raises(LeaseHeld, match="being written by laionface publish on gpu-node-7"):
        publish(str(built.run), str(target))
    assert sorted(p.name for p in target.iterdir()) == ["lease.json"]  # nothing copied
    (target / "lease.json").unlink()
    assert publish(str(built.run), str(target)) == 0
    assert not (target / "lease.json").exists()
    assert verify(str(target)) == []
