"""Cluster start-up: a client for a running Dask scheduler, or a LocalCluster sized from config."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from laionface.io import storage

if TYPE_CHECKING:
    from laionface.config import Config

log = logging.getLogger("laionface")

# Imported once in a fork server that every LocalCluster worker forks from, as img2dataset's
# own processes fork after one import: spawned workers each paid ~3 s of CPU importing
# img2dataset and torch (benchmarks/bench_download.py). Besides these, what the stages a command
# runs need (`pipeline.worker_preload(stages)`): a metadata-only run's workers then hold neither
# torch nor img2dataset (~250 MB each).
WORKER_PRELOAD = ("distributed", "numpy", "pyarrow", "pandas")

# The fork server's environment. A process that forks while other threads run hands its children
# every lock those threads held at that instant (a malloc arena, a BLAS pool's queue), held
# forever: a worker then stalls in its first allocation. Importing the preload normally starts
# four such threads (pyarrow's jemalloc purger, OpenBLAS and OpenMP pools); with these settings
# none starts, so the fork server forks from its only thread (tests/test_cluster_start.py).
# Workers inherit them: Dask gives its workers the same BLAS/OpenMP settings anyway, and
# jemalloc then purges as it allocates instead of in a background thread.
FORK_SERVER_ENVIRON = {
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _start_fork_server(modules: Iterable[str]) -> None:
    """Start the fork server that LocalCluster workers fork from, with `modules` preloaded
    (a running one is kept: its preload was fixed when it started)."""
    import multiprocessing.forkserver

    import dask
    from distributed.utils import get_mp_context

    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    # get_mp_context sets Dask's own preload list the first time; ours replaces it.
    get_mp_context().set_forkserver_preload([*WORKER_PRELOAD, *modules])
    saved = {name: os.environ.get(name) for name in FORK_SERVER_ENVIRON}
    os.environ.update(FORK_SERVER_ENVIRON)  # the server copies the environment as it starts
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _existing(address: str) -> Iterator[Any]:
    from distributed import Client

    # A path to a JSON file is a scheduler file (`dask scheduler --scheduler-file`, HPC use).
    target = {"scheduler_file": address} if address.endswith(".json") else {"address": address}
    with Client(**target) as client:
        log.info("connected to Dask scheduler %s (dashboard: %s)", address, client.dashboard_link)
        yield client


@contextlib.contextmanager
def open_client(
    config: Config,
    run_url: str,
    scheduler: str = "",
    workers: int | None = None,
    preload: Iterable[str] = (),
) -> Iterator[Any]:
    """A client for `--scheduler ADDRESS` / `cluster.scheduler`, or a LocalCluster sized from config.

    `preload`: modules a LocalCluster's worker processes import before they start, besides
    WORKER_PRELOAD.
    """
    from distributed import Client, LocalCluster

    address = scheduler or config.cluster.scheduler
    if address:
        with _existing(address) as client:
            yield client
        return
    # memory:// exists only inside this process, so its workers must be threads here.
    processes = not storage.is_process_local(run_url)
    dashboard = bool(config.cluster.dashboard_address)
    if processes:
        _start_fork_server(preload)
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


def gather_map(client: Any, fn: Callable[..., Any], kwargs: list[dict]) -> list[Any]:
    """`fn(**k)` for each k on the cluster behind `client`, the results in order: for reads
    that return small per-shard figures, so the driver holds figures, not rows (no markers,
    no retries: a failure is raised as it is)."""
    # The arguments travel as one dict: spread into submit, a name such as `retries` or
    # `resources` would be taken as submit's own.
    return client.gather([client.submit(_call, fn, k, pure=False) for k in kwargs])


def _call(fn: Callable[..., Any], kwargs: dict) -> Any:
    return fn(**kwargs)
