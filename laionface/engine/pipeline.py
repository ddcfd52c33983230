"""The pipeline: the declared stages, run in order over one Dask client, then the audit.

A stage is the module or package `laionface.stages.<name>` for each name of layout.STAGE_ORDER;
its `STAGE` (engine.stage.Stage) says what it reads, writes and depends on. After the stages a
command ran, the audit counts every row's fate once (audit.funnel.write_audit, which raises when
the funnel does not add up), and the stages that have a `finish` get the funnel (emit completes
its dataset.json with it, so a dataset whose rows don't add up is never marked complete).
"""

from __future__ import annotations

import importlib
import io
import logging
import time
from collections.abc import Iterable
from typing import Any

from laionface.audit.funnel import write_audit
from laionface.config import Config, ConfigError
from laionface.engine.cluster import open_client
from laionface.engine.lease import holding
from laionface.engine.markers import now_iso
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext
from laionface.engine.stage import Stage
from laionface.io import storage
from laionface.layout import STAGE_ORDER

log = logging.getLogger("laionface")


def stage_module(name: str) -> str:
    return f"laionface.stages.{name}"


def stage_of(name: str) -> Stage:
    """The declaration of stage `name` (imports its module)."""
    return importlib.import_module(stage_module(name)).STAGE


def worker_preload(names: Iterable[str]) -> list[str]:
    """The modules LocalCluster workers import before they start, for these stages: each stage's
    module and the imports its tasks make lazily."""
    return [m for name in names for m in (stage_module(name), *stage_of(name).worker_imports)]


def parse_stages(text: str | Iterable[str] | None) -> list[str]:
    """`--stages metadata,download` -> validated names in pipeline order (all when empty)."""
    if not text:
        return list(STAGE_ORDER)
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    unknown = [n for n in names if n not in STAGE_ORDER]
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
        storage.write_bytes(self.run.layout.log(self.started), self.buffer.getvalue().encode())


def run_stage(ctx: StageContext) -> None:
    """Run one stage, recording in run.json its settings, status and timing (failed, with the
    error, whatever the error)."""
    stage = ctx.stage
    assert stage is not None
    ctx.run.record_stage(stage, ctx.config)
    status = ctx.run.stage(stage.name)
    status.update(status="running", started=now_iso())
    status.pop("error", None)
    ctx.run.save()
    started = time.perf_counter()
    try:
        stage.run(ctx)
    except BaseException as exc:
        status.update(status="failed", finished=now_iso(), error=f"{type(exc).__name__}: {exc}")
        ctx.run.save()
        raise
    status.update(
        status="done", finished=now_iso(), seconds=round(time.perf_counter() - started, 3)
    )
    ctx.run.save()


def run_stages(
    config: Config,
    run: RunFolder,
    client: Any,
    names: Iterable[str],
    progress: bool = True,
    options: dict | None = None,
) -> dict:
    """Run the stages `names` in order on `client`, then the audit, then the stages' finish;
    returns the funnel (`Funnel.as_dict()`)."""
    contexts = []
    for name in names:
        ctx = StageContext(
            config,
            run,
            client,
            progress=progress,
            options=dict(options or {}),
            stage=stage_of(name),
        )
        run_stage(ctx)
        contexts.append(ctx)
    # Every input row must have exactly one fate; a mismatch is an error naming the shards.
    funnel = write_audit(run.url, client).as_dict()
    for ctx in contexts:
        if ctx.stage is not None and ctx.stage.finish is not None:
            ctx.stage.finish(ctx, funnel)
    return funnel


def run_pipeline(
    config: Config,
    run_dir: str | None = None,
    stages: str | Iterable[str] | None = None,
    scheduler: str = "",
    workers: int | None = None,
    progress: bool = True,
    options: dict | None = None,
    force: bool = False,
) -> RunFolder:
    """Run the chosen stages in order, then the audit; raises StageFailed naming the shards that
    failed, ConservationError when the funnel does not add up, or LeaseHeld when another command
    is writing the run folder (`force` takes over a stale lease)."""
    names = parse_stages(stages)
    run_url = resolve_run_url(config, run_dir)
    preload = worker_preload(names)
    with holding(run_url, "laionface run", force):
        run = RunFolder(run_url)
        run.start(config)
        with _RunLog(run), open_client(config, run.url, scheduler, workers, preload) as client:
            log.info("run folder: %s", run.url)
            run_stages(config, run, client, names, progress, options)
    return run
