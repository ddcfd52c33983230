"""Cluster start-up: a client for a running Dask scheduler, or a LocalCluster sized from config."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
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


def _preload_worker_imports(modules: Iterable[str]) -> None:
    import dask
    from distributed.utils import get_mp_context

    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    # get_mp_context sets Dask's own preload list the first time; ours replaces it.
    get_mp_context().set_forkserver_preload([*WORKER_PRELOAD, *modules])


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
