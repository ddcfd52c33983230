"""The pipeline: the ordered stages, each a module with `run(ctx)`, run over one Dask client.

A stage module holds the plain per-shard function(s) and a `run(ctx: StageContext)` that lists the
shards and hands them to `ctx.map_shards`; nothing in a stage knows about Dask.
"""

from __future__ import annotations

import importlib
import io
import logging
import time
from collections.abc import Iterable

from laionface.audit import funnel as audit
from laionface.config import STAGE_ORDER, Config, ConfigError
from laionface.engine.runner import RunFolder, StageContext, now_iso, open_client
from laionface.io import storage

log = logging.getLogger("laionface")

# Stage name -> module with `run(ctx)`. Order is STAGE_ORDER.
STAGE_MODULES = {
    "metadata": "laionface.stages.metadata.stage",
    "download": "laionface.stages.download.stage",
    "faces": "laionface.stages.faces",
    "select": "laionface.stages.select",
    "dedup": "laionface.stages.dedup.stage",
    "emit": "laionface.stages.emit",
}
# What a stage's workers import besides its module: imports the module makes only inside its
# task functions, so that loading it on the driver stays cheap.
STAGE_WORKER_IMPORTS = {"download": ("img2dataset.downloader",)}


def worker_preload(names: Iterable[str]) -> list[str]:
    """The modules LocalCluster workers import before they start, for these stages."""
    return [m for name in names for m in (STAGE_MODULES[name], *STAGE_WORKER_IMPORTS.get(name, ()))]


def parse_stages(text: str | Iterable[str] | None) -> list[str]:
    """`--stages metadata,download` -> validated names in pipeline order (all when empty)."""
    if not text:
        return list(STAGE_ORDER)
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    unknown = [n for n in names if n not in STAGE_MODULES]
    if unknown:
        raise ConfigError(
            f"--stages: unknown stage(s) {', '.join(unknown)}; the stages are "
            f"{', '.join(STAGE_ORDER)}"
        )
    return [s for s in STAGE_ORDER if s in names]


def resolve_run_url(config: Config, run_dir: str | None) -> str:
    return run_dir or config.run.run_dir.format(name=config.run.name)


class _RunLog:
    """Collects this command's log lines and saves them in the run folder's logs/."""

    def __init__(self, run: RunFolder):
        self.run = run
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.started = time.strftime("%Y%m%d-%H%M%S")

    def __enter__(self) -> _RunLog:
        log.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self.handler)
        storage.write_bytes(
            self.run.path("logs", f"{self.started}.log"), self.buffer.getvalue().encode()
        )


def run_pipeline(
    config: Config,
    run_dir: str | None = None,
    stages: str | Iterable[str] | None = None,
    scheduler: str = "",
    workers: int | None = None,
    progress: bool = True,
    options: dict | None = None,
) -> RunFolder:
    """Run the chosen stages in order; raises StageFailed naming the shards that failed.

    A stage that raises is marked "failed" in run.json with its error, whatever the error.
    """
    names = parse_stages(stages)
    run_url = resolve_run_url(config, run_dir)
    run = RunFolder(run_url)
    run.start(config)
    preload = worker_preload(names)
    with _RunLog(run), open_client(config, run_url, scheduler, workers, preload) as client:
        log.info("run folder: %s", run_url)
        ctx = StageContext(config, run, client, progress=progress, options=dict(options or {}))
        for name in names:
            module = importlib.import_module(STAGE_MODULES[name])
            status = run.stage(name)
            status.update(status="running", started=now_iso())
            run.save()
            started = time.perf_counter()
            try:
                module.run(ctx)
            except BaseException as exc:
                status.update(
                    status="failed", finished=now_iso(), error=f"{type(exc).__name__}: {exc}"
                )
                run.save()
                raise
            status.update(
                status="done", finished=now_iso(), seconds=round(time.perf_counter() - started, 3)
            )
            run.save()
        # Every input row must have exactly one fate; a mismatch is an error naming the shards.
        audit.write_audit(run_url)
    return run
