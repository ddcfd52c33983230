"""The pipeline on real Dask processes: `dask scheduler` and `dask worker` started here, killed
workers and a killed driver, and the same dataset every time.

All runs use a small demo corpus (120 rows in 6 download shards) served on 127.0.0.1 and the
`laionface run` command in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from distributed import Client

from laionface.cli import build_parser
from laionface.demo.corpus import DEMO_HOST, build_corpus
from laionface.demo.imageserver import ImageServer

REPO = Path(__file__).resolve().parents[1]
# The `dask` command of this environment (make test runs without activating the venv).
DASK = str(Path(sys.executable).with_name("dask"))
SHARDS = 6
SETTINGS = [
    "metadata.rows_per_shard=20",
    "emit.samples_per_shard=15",
    "download.timeout=1.0",
    "cluster.dashboard_address=''",
    "cluster.retries=3",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The small corpus, plus an exclude list of its flaky URLs (500 once, then 200) beside it.

    A shard redone after a killed worker asks a flaky URL again and gets the image, so only
    without them does every run meet the same outcomes. The opt-out list is a real metadata
    feature (metadata.exclude_list), not a test hook."""
    built = build_corpus(
        tmp_path_factory.mktemp("cluster") / "corpus", seed=3, n_images=SHARDS * 20
    )
    flaky = [row["URL"] for row in built.read_truth().to_pylist() if row["case"] == "flaky"]
    assert flaky
    (built.root.parent / "flaky-urls.txt").write_text("\n".join(flaky) + "\n")
    return built


@pytest.fixture(scope="module")
def server(corpus):
    with ImageServer(corpus.root, slow_seconds=3.0) as running:
        yield running


def run_command(corpus, server, run_dir: Path, *extra: str) -> list[str]:
    """The `laionface run` command line for a run about to start.

    The server forgets its flaky URLs' attempts, so every run meets the same failures."""
    server.reset()
    exclude = corpus.root.parent / "flaky-urls.txt"
    settings = [
        f"metadata.input={json.dumps([str(corpus.metadata_path)])}",
        f"metadata.exclude_list={json.dumps(str(exclude))}",
        f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}',
        *SETTINGS,
    ]
    command = [sys.executable, "-m", "laionface", "run", str(REPO / "pipelines" / "demo.toml")]
    command += ["--run-dir", str(run_dir), "--no-progress"]
    for setting in settings:
        command += ["--set", setting]
    return command + list(extra)


def run_ok(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


def dataset_snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every dataset file's bytes; dataset.json without what names the run or the time."""
    folder = run_dir / "dataset"
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    meta = json.loads(files.pop("dataset.json"))
    for volatile in ("created", "run", "run_url", "versions"):
        meta.pop(volatile, None)
    for stage in meta.get("stages", {}).values():
        stage.pop("finished", None)
    files["dataset.json"] = json.dumps(meta, sort_keys=True).encode()
    assert any(name.endswith(".tar") for name in files)
    return files


def markers(run_dir: Path, stage: str) -> dict[str, dict]:
    folder = run_dir / stage / "_done"
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def verify_ok(run_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "laionface", "verify", str(run_dir / "dataset")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def stats_ok(run_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "laionface", "stats", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def clean_run(corpus, server, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    run_ok(run_command(corpus, server, run_dir))
    return run_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaskProcesses:
    """`dask scheduler` and `dask worker` processes, as docker/compose.yaml starts them."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, command: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{len(self.procs)}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.procs.append(proc)
        return proc

    def up(self, workers: list[list[str]]) -> None:
        self.start(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port)]
            + ["--no-dashboard"]
        )
        for extra in workers:
            self.start(
                [
                    DASK,
                    "worker",
                    self.address,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    *extra,
                ]
            )
        deadline = time.time() + 120
        with Client(self.address, timeout=60) as client:
            while len(client.scheduler_info(n_workers=-1)["workers"]) < len(workers):
                assert time.time() < deadline, "dask workers did not register"
                time.sleep(0.2)

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid of the process that runs tasks (the nanny's child)."""
        with Client(self.address, timeout=60) as client:
            return client.run(os.getpid)

    def down(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory):
    cluster = DaskProcesses(tmp_path_factory.mktemp("dask"))
    # One plain CPU worker and one that offers a GPU resource, like compose.yaml's two kinds.
    cluster.up([["--name", "cpu-0"], ["--name", "gpu-0", "--resources", "GPU=1"]])
    yield cluster
    cluster.down()


def test_real_cluster_run_equals_local_cluster_run(
    corpus, server, clean_run, dask_processes, tmp_path
):
    run_dir = tmp_path / "run"
    run_ok(run_command(corpus, server, run_dir, "--scheduler", dask_processes.address))
    assert dataset_snapshot(run_dir) == dataset_snapshot(clean_run)
    verify_ok(run_dir)
    stats_ok(run_dir)
    # The work really ran on the two worker processes, not in the driver.
    pids = set(dask_processes.worker_pids().values())
    ran_on = {int(m["worker"].rsplit(":", 1)[1]) for m in markers(run_dir, "download").values()}
    assert ran_on <= pids and ran_on


def test_faces_tasks_go_to_workers_with_the_resource(corpus, server, dask_processes, tmp_path):
    run_dir = tmp_path / "run"
    run_ok(
        run_command(
            corpus,
            server,
            run_dir,
            "--scheduler",
            dask_processes.address,
            "--set",
            "faces.resources={GPU = 1}",
        )
    )
    by_name = {}
    with Client(dask_processes.address) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        pids = client.run(os.getpid)
        for address, worker in info.items():
            by_name[worker["name"]] = pids[address]
    faces_on = {int(m["worker"].rsplit(":", 1)[1]) for m in markers(run_dir, "faces").values()}
    assert faces_on == {by_name["gpu-0"]}
    download_on = {
        int(m["worker"].rsplit(":", 1)[1]) for m in markers(run_dir, "download").values()
    }
    assert by_name["cpu-0"] in download_on  # the other stages run on any worker


def _wait_for_markers(run_dir: Path, stage: str, proc: subprocess.Popen, low: int = 1) -> int:
    """Wait until `stage` has between `low` and SHARDS - 1 finished shards; return the count."""
    deadline = time.time() + 600
    while time.time() < deadline:
        count = len(markers(run_dir, stage))
        if low <= count < SHARDS:
            return count
        assert count < SHARDS, f"stage {stage} finished before the planned kill"
        assert proc.poll() is None, f"the run ended before stage {stage} started: {proc.args}"
        time.sleep(0.02)
    raise AssertionError(f"stage {stage} never started")


def test_killed_workers_lose_nothing(corpus, server, clean_run, tmp_path):
    cluster = DaskProcesses(tmp_path / "dask")
    (tmp_path / "dask").mkdir()
    cluster.up([["--name", "a"], ["--name", "b"]])
    try:
        run_dir = tmp_path / "run"
        proc = subprocess.Popen(
            run_command(corpus, server, run_dir, "--scheduler", cluster.address),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        killed = []
        for stage in ("download", "faces"):
            done_before = _wait_for_markers(run_dir, stage, proc)
            pid = sorted(cluster.worker_pids().values())[0]
            os.kill(pid, signal.SIGKILL)  # the nanny starts a fresh worker process
            killed.append((stage, done_before))
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output
        assert [stage for stage, _ in killed] == ["download", "faces"]
    finally:
        cluster.down()
    verify_ok(run_dir)
    stats_ok(run_dir)
    assert dataset_snapshot(run_dir) == dataset_snapshot(clean_run)


def test_killed_run_resumes_only_unfinished_shards(corpus, server, clean_run, tmp_path):
    run_dir = tmp_path / "run"
    command = run_command(corpus, server, run_dir)
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    _wait_for_markers(run_dir, "faces", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The killed driver's LocalCluster processes lose their scheduler; wait until they are gone.
    group = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == proc.pid]
    _, alive = psutil.wait_procs(group, timeout=90)
    assert not alive, f"LocalCluster processes outlived their killed driver: {alive}"

    downloads_before = markers(run_dir, "download")
    faces_before = markers(run_dir, "faces")
    assert len(downloads_before) == SHARDS and 1 <= len(faces_before) < SHARDS
    run_ok(command)

    # Finished shards were not redone: their markers are untouched; the others were made now.
    assert markers(run_dir, "download") == downloads_before
    faces_after = markers(run_dir, "faces")
    assert {k: faces_after[k] for k in faces_before} == faces_before
    assert len(faces_after) == SHARDS
    verify_ok(run_dir)
    assert dataset_snapshot(run_dir) == dataset_snapshot(clean_run)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_compose_file_runs_real_commands():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"scheduler", "cpu-worker", "gpu-worker", "driver"} <= set(services)
    for name, service in services.items():
        command = service["command"]
        if command[0] == "laionface":
            args = build_parser().parse_args(command[1:])  # a real laionface command line
            assert (REPO / args.pipeline).is_file()
            assert args.scheduler == "tcp://scheduler:8786"
        else:
            assert command[:2] in (["dask", "scheduler"], ["dask", "worker"]), name
            # The same flags the tests above start real processes with.
            help_text = subprocess.run([DASK, command[1], "--help"], capture_output=True, text=True)
            for flag in (a for a in command[2:] if a.startswith("--")):
                assert flag in help_text.stdout, f"{name}: {flag} is not a {command[1]} option"
    gpu = services["gpu-worker"]["command"]
    assert gpu[gpu.index("--resources") + 1] == "GPU=1"
    for path in ("docker/Dockerfile.cpu", "docker/Dockerfile.cuda"):
        text = (REPO / path).read_text()
        # The worker runs the detector and reads object stores: both extras.
        assert 'pip install ".[faces,s3]"' in text and "resolve_weights" in text
