"""A LocalCluster's workers fork from a fork server that has no thread but its own.

A process that forks while other threads run can hand its child a lock held forever (a malloc
arena, a BLAS pool): a worker forked then stalls. The fork server preloads pyarrow, numpy,
torch, img2dataset and the stages, which would otherwise start threads at import. Checked in a
fresh process, as a `laionface run` starts one (a fork server is started once per process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, multiprocessing.forkserver, os, sys
import psutil
from laionface.config import Config
from laionface.engine.cluster import open_client
from laionface.engine.pipeline import worker_preload
from laionface.layout import STAGE_ORDER

def threads(pid):
    folder = f"/proc/{pid}/task"
    return [open(f"{folder}/{tid}/comm").read().strip() for tid in os.listdir(folder)]

config = Config()
config.cluster.dashboard_address = ""
with open_client(config, sys.argv[1], preload=worker_preload(STAGE_ORDER)) as client:
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    loaded = client.run(
        lambda: sorted(m for m in ("torch", "pyarrow", "img2dataset") if m in sys.modules)
    )
    parents = {psutil.Process(pid).ppid() for pid in client.run(os.getpid).values()}
    print(json.dumps({
        "server_threads": threads(server),
        "loaded": list(loaded.values()),
        "forked_from_server": parents == {server},
        "task": client.submit(sum, [1, 2, 3]).result(),
        "driver_environ": os.environ.get("JE_ARROW_MALLOC_CONF"),
    }))
"""


def test_workers_fork_from_a_single_threaded_server_and_run_tasks(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["server_threads"] == ["python"]
    assert seen["loaded"] and all(m == ["img2dataset", "pyarrow", "torch"] for m in seen["loaded"])
    assert seen["forked_from_server"] and seen["task"] == 6
    assert seen["driver_environ"] is None  # the driver's own environment is left as it was
