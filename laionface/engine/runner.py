"""Maps a stage's plain per-shard function over shards on a dask.distributed cluster.

The executor is kept apart from the stages (as in datatrove): a stage module only knows its own
per-shard function and which shards exist; this module decides where they run, skips shards that
are already complete, retries failures, records the ones that still fail, and shows progress.

Completion is recorded per shard by a marker `{run}/{step}/_done/{shard}.json`, written on the
worker after the shard's outputs are in place. A marker carries the fingerprint of the settings the
shard was made with (config.fingerprint), so a changed setting redoes exactly the affected shards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from laionface.config import Config
from laionface.io import storage

log = logging.getLogger("laionface")


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: `fn(**kwargs)` makes shard `shard` of a step."""

    shard: str
    kwargs: dict[str, Any]


class StageFailed(RuntimeError):
    """Some shards still failed after their retries; the others are complete."""

    def __init__(self, step: str, failures: dict[str, str]):
        self.step = step
        self.failures = failures
        lines = [f"  {shard}: {error}" for shard, error in sorted(failures.items())]
        super().__init__(
            f"stage {step}: {len(failures)} shard(s) failed after retries:\n"
            + "\n".join(lines)
            + "\nRe-run the same command to retry only these shards."
        )


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("laionface", "dask", "distributed", "pyarrow", "torch", "img2dataset", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


class RunFolder:
    """A run's folder on any fsspec URL; `run.json` holds config, versions and stage status.

    Only the driver writes run.json (workers write shard outputs and markers), so updates need no
    locking.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.state: dict[str, Any] = {}
        if storage.exists(self.path("run.json")):
            self.state = storage.read_json(self.path("run.json"))

    def path(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def start(self, config: Config) -> None:
        """Record the resolved config (also as its own file) and the software versions."""
        storage.makedirs(self.url)
        self.state.setdefault("created", now_iso())
        self.state["config"] = config.resolved()
        self.state["versions"] = software_versions()
        self.state.setdefault("stages", {})
        storage.write_json(self.path("config.json"), config.resolved())
        self.save()

    def stage(self, name: str) -> dict[str, Any]:
        return self.state.setdefault("stages", {}).setdefault(name, {})

    def save(self) -> None:
        storage.write_json(self.path("run.json"), self.state)


def _run_shard(fn: Callable[..., dict], kwargs: dict, marker_url: str, fingerprint: str) -> dict:
    """Runs on a worker: make the shard, then mark it complete."""
    started = time.perf_counter()
    stats = dict(fn(**kwargs) or {})
    stats.setdefault("items", 0)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    storage.write_json(
        marker_url,
        {
            "fingerprint": fingerprint,
            "stats": stats,
            "finished": now_iso(),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        },
    )
    return stats


def read_markers(marker_dir: str) -> dict[str, dict]:
    """{shard: marker} of the completion markers in `marker_dir` (empty if none)."""
    fs, path = storage.fs_for(marker_dir)
    if not fs.exists(path):
        return {}
    names = [p for p in fs.ls(path, detail=False) if p.endswith(".json")]
    names = [p for p in names if not os.path.basename(p).startswith(storage.TEMP_PREFIX)]
    if not names:
        return {}
    import json

    blobs = fs.cat(names)
    out = {}
    for name, blob in blobs.items():
        with contextlib.suppress(ValueError):
            out[os.path.basename(name)[: -len(".json")]] = json.loads(blob)
    return out


def _require_resources(client: Any, resources: dict[str, float], step: str) -> None:
    """Fail fast instead of waiting forever for a worker that can take the tasks."""
    try:
        info = client.scheduler_info(n_workers=-1)  # newer distributed lists 5 workers by default
    except TypeError:
        info = client.scheduler_info()
    workers = info["workers"].values()
    if any(
        all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items()) for w in workers
    ):
        return
    wanted = " ".join(f"{k}={v:g}" for k, v in resources.items())
    raise RuntimeError(
        f"stage {step} needs a worker with resources {wanted}, and none of the "
        f"{len(workers)} workers has them: start one with `dask worker ADDRESS --resources "
        f'"{wanted}"`, or run this stage on CPU (--set faces.device=cpu)'
    )


@dataclass
class StageContext:
    """What a stage's `run(ctx)` gets: the config, the run folder and a way to map shards."""

    config: Config
    run: RunFolder
    client: Any  # distributed.Client
    progress: bool = True
    # Command-line switches a stage may read, e.g. {"retry_failed": True}.
    options: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return self.run.path(*parts)

    def run_once(self, fn: Callable[..., Any], *args: Any, resources: dict | None = None) -> Any:
        """`fn(*args)` on one worker (one that offers `resources`), without retries: a pre-flight
        check whose failure is one clear error rather than one per shard and retry."""
        if resources:
            _require_resources(self.client, resources, fn.__name__)
        return self.client.submit(fn, *args, resources=resources, pure=False).result()

    def map_shards(
        self,
        step: str,
        fn: Callable[..., dict],
        tasks: list[ShardTask],
        *,
        fingerprint: str = "",
        resources: dict[str, float] | None = None,
        unit: str = "items",
    ) -> dict[str, dict]:
        """Run `fn(**task.kwargs)` for every task not already complete under `fingerprint`.

        Returns the stats of every complete shard (earlier runs included). Shards that still fail
        after `cluster.retries` retries are recorded and raised as StageFailed once all others
        have finished.
        """
        from distributed import as_completed

        marker_dir = self.path(step, "_done")
        markers = read_markers(marker_dir)
        done: dict[str, dict] = {}
        todo: list[ShardTask] = []
        for task in tasks:
            marker = markers.get(task.shard)
            if marker is not None and marker.get("fingerprint") == fingerprint:
                done[task.shard] = marker["stats"]
            else:
                todo.append(task)

        status = self.run.stage(step)
        status.update(
            status="running",
            started=now_iso(),
            shards_total=len(tasks),
            shards_skipped=len(done),
            fingerprint=fingerprint,
        )
        status.pop("failed", None)
        self.run.save()
        started = time.perf_counter()
        failures: dict[str, str] = {}
        items = 0
        bar = tqdm(
            total=len(tasks),
            initial=len(done),
            desc=step,
            unit="shard",
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        if todo and resources:
            _require_resources(self.client, resources, step)
        futures = {}
        for task in todo:
            future = self.client.submit(
                _run_shard,
                fn,
                task.kwargs,
                storage.join(marker_dir, f"{task.shard}.json"),
                fingerprint,
                key=f"{step}-{task.shard}-{fingerprint}-{time.time_ns()}",
                retries=self.config.cluster.retries,
                resources=resources,
                pure=False,
            )
            futures[future] = task.shard
        for future in as_completed(list(futures)):
            shard = futures[future]
            try:
                stats = future.result()
            except Exception as exc:  # recorded; the other shards go on
                failures[shard] = f"{type(exc).__name__}: {exc}"
                log.debug("shard %s/%s failed:\n%s", step, shard, traceback.format_exc())
            else:
                done[shard] = stats
                items += int(stats.get("items", 0))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{items / elapsed:,.1f} {unit}/s", refresh=False)
            bar.update(1)
        bar.close()

        elapsed = time.perf_counter() - started
        status.update(
            status="failed" if failures else "done",
            finished=now_iso(),
            seconds=round(elapsed, 3),
            shards_done=len(done),
            items=sum(int(s.get("items", 0)) for s in done.values()),
        )
        if failures:
            status["failed"] = failures
        self.run.save()
        log.info(
            "%s: %d/%d shards complete (%d skipped as already done), %d %s in %.1f s%s",
            step,
            len(done),
            len(tasks),
            len(tasks) - len(todo),
            items,
            unit,
            elapsed,
            f", {len(failures)} FAILED" if failures else "",
        )
        if failures:
            self.failures[step] = failures
            raise StageFailed(step, failures)
        return done


# Imported once in a fork server that every LocalCluster worker forks from, as img2dataset's
# own processes fork after one import: spawned workers each paid ~3 s of CPU importing
# img2dataset and torch (benchmarks/bench_download.py). Besides these, what the stages a command
# runs need (`open_client(preload=pipeline.worker_preload(stages))`): a metadata-only run's
# workers then hold neither torch nor img2dataset (~250 MB each).
WORKER_PRELOAD = ("distributed", "numpy", "pyarrow", "pandas")


def _preload_worker_imports(modules: Iterable[str]) -> None:
    import dask
    from distributed.utils import get_mp_context

    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    # get_mp_context sets Dask's own preload list the first time; ours replaces it.
    get_mp_context().set_forkserver_preload([*WORKER_PRELOAD, *modules])


@contextlib.contextmanager
def open_client(
    config: Config,
    run_url: str,
    scheduler: str = "",
    workers: int | None = None,
    preload: Iterable[str] | None = None,
) -> Iterator[Any]:
    """A client for `--scheduler ADDRESS` / `cluster.scheduler`, or a LocalCluster sized from config.

    `preload`: the modules a LocalCluster's worker processes import before they start (None:
    every stage's).
    """
    from distributed import Client, LocalCluster

    address = scheduler or config.cluster.scheduler
    if address:
        # A path to a JSON file is a scheduler file (`dask scheduler --scheduler-file`, HPC use).
        target = {"scheduler_file": address} if address.endswith(".json") else {"address": address}
        with Client(**target) as client:
            log.info(
                "connected to Dask scheduler %s (dashboard: %s)", address, client.dashboard_link
            )
            yield client
        return
    # memory:// exists only inside this process, so its workers must be threads here.
    processes = not storage.is_process_local(run_url)
    dashboard = bool(config.cluster.dashboard_address)
    if processes:
        if preload is None:
            from laionface.engine.pipeline import (  # pipeline imports us
                STAGE_MODULES,
                worker_preload,
            )

            preload = worker_preload(STAGE_MODULES)
        _preload_worker_imports(preload)
    cluster = LocalCluster(
        n_workers=workers or config.cluster.workers,
        threads_per_worker=config.cluster.threads_per_worker,
        processes=processes,
        memory_limit=config.cluster.memory_limit,
        # The scheduler keeps an HTTP server (health checks) even without a dashboard; a free
        # port stops it from fighting over :8787 with other clusters on the machine.
        dashboard_address=config.cluster.dashboard_address or ":0",
        scheduler_kwargs={"dashboard": dashboard},
        # Task errors reach the user through StageFailed, once, with the shard named.
        silence_logs=logging.CRITICAL,
    )
    with cluster, Client(cluster) as client:
        if dashboard:
            log.info("Dask dashboard: %s", client.dashboard_link)
        yield client
