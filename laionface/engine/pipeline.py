"""The pipeline: the declared stages, run in order over one Dask client, then the audit.

A stage is the module or package `laionface.stages.<name>` for each name of layout.STAGE_ORDER;
its `STAGE` (engine.stage.Stage) says what it reads, writes and depends on. After the stages a
command ran, the audit counts every row's fate once (audit.funnel.write_audit, which raises when
the funnel does not add up), and the stages that have a `finish` get the funnel (emit completes
its dataset.json with it, so a dataset whose rows don't add up is never marked complete).

Before anything is written (the lease, run.json, logs/) or a cluster starts, `preflight` checks
what a run needs from outside: metadata.input's files (the metadata stage's own checks) and that
the Dask scheduler to use answers. An empty result is a result: when a stage keeps no row, the
stages after it run on nothing, the dataset is empty, and a warning names the stage.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
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
from laionface.stages.metadata.inputs import InputFile, inspect_inputs, resolve_inputs

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


# How long the Dask scheduler named by --scheduler / cluster.scheduler has to accept a
# connection before the run stops, before anything is written.
SCHEDULER_CHECK_SECONDS = 5.0
# Dask's scheduler port, when an address names none.
SCHEDULER_PORT = 8786


class SchedulerUnreachable(ConfigError):
    """No Dask scheduler answers at the address given; the message says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run, raised in the main thread so that the run stops as on Ctrl-C: the
    interruption logged, the cluster closed, the lease given back. `signum`: the exit code is
    128 + signum."""

    signum = signal.SIGTERM


def check_inputs(config: Config, names: Iterable[str]) -> list[InputFile]:
    """metadata.input's files with their row groups, checked as the metadata stage checks them
    (missing or empty metadata.input, files that don't exist, unreadable footers, missing
    columns), when the metadata stage is among `names`; [] otherwise."""
    if "metadata" not in names:
        return []
    section = config.metadata
    return inspect_inputs(resolve_inputs(section.input), section.columns)


def scheduler_address(address: str) -> str:
    """The scheduler's address: `address`, or the one the scheduler file (.json) holds."""
    if not address.endswith(".json"):
        return address
    try:
        return str(storage.read_json(address)["address"])
    except FileNotFoundError:
        raise SchedulerUnreachable(
            f"scheduler file {address} not found: start the scheduler with "
            f"`dask scheduler --scheduler-file {address}`, or check the path"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise SchedulerUnreachable(
            f"{address}: not a Dask scheduler file (JSON with an address)"
        ) from None


def check_scheduler(address: str, timeout: float = SCHEDULER_CHECK_SECONDS) -> None:
    """Raise SchedulerUnreachable when nothing accepts a connection at the scheduler `address`
    (tcp://HOST:PORT, or a scheduler file) within `timeout` seconds. Addresses of transports
    other than TCP (inproc, ucx) are left to the client."""
    from distributed.comm.addressing import parse_address, parse_host_port

    target = scheduler_address(address)
    try:
        protocol, location = parse_address(target)
        host, port = parse_host_port(location, default_port=SCHEDULER_PORT)
    except ValueError as exc:
        raise SchedulerUnreachable(f"scheduler address {address!r}: {exc}") from None
    if protocol not in ("tcp", "tls", "ws", "wss"):
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise SchedulerUnreachable(
            f"no Dask scheduler answers at {target} ({exc or type(exc).__name__}, waited "
            f"{timeout:g} s): start it (`dask scheduler`), check --scheduler / "
            "cluster.scheduler, or leave both empty for a LocalCluster on this machine"
        ) from None


def preflight(config: Config, names: Iterable[str], scheduler: str = "") -> list[InputFile]:
    """What a run needs from outside, checked before it writes anything or starts a cluster:
    the inputs (check_inputs, returned) and the scheduler (check_scheduler)."""
    inputs = check_inputs(config, names)
    address = scheduler or config.cluster.scheduler
    if address:
        check_scheduler(address)
    return inputs


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread for the block (elsewhere it can't be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def empty_result_warning(funnel: dict, names: Iterable[str]) -> str | None:
    """The warning for a run that kept no row: which stage kept nothing (None when rows remain)."""
    stages = funnel.get("stages") or []
    if not stages or funnel["kept"]:
        return None
    outcome = (
        "the published dataset is empty (0 samples)"
        if "emit" in names
        else "the stages after it have nothing to run on"
    )
    first = stages[0]
    if not first["input"]:
        return f"{first['stage']}: the input has no rows, so every stage ran on nothing: {outcome}"
    emptied = next(s for s in stages if not s["kept"])
    dropped = ", ".join(f"{reason} {n:,}" for reason, n in emptied["dropped"].items())
    return (
        f"{emptied['stage']} kept none of its {emptied['input']:,} rows (dropped: "
        f"{dropped or 'none'}), so the stages after it ran on nothing: {outcome}"
    )


class _RunLog:
    """Collects this command's log lines and saves them in the run folder's logs/, with the
    interruption or error that ended the command, if any."""

    def __init__(self, run: RunFolder):
        self.run = run
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.started = time.strftime("%Y%m%d-%H%M%S")

    def __enter__(self) -> _RunLog:
        log.addHandler(self.handler)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb) -> None:
        if isinstance(exc, Terminated):
            self._note("interrupted by SIGTERM: stopped; re-run the same command to resume")
        elif isinstance(exc, KeyboardInterrupt):
            self._note("interrupted (Ctrl-C): stopped; re-run the same command to resume")
        elif exc is not None:
            self._note(f"failed: {type(exc).__name__}: {exc}")
        log.removeHandler(self.handler)
        storage.write_bytes(self.run.layout.log(self.started), self.buffer.getvalue().encode())

    def _note(self, text: str) -> None:
        """An error line in this log only (the command line says it on stderr itself)."""
        self.handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, text, (), None))


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
    is writing the run folder (`force` takes over a stale lease). Bad inputs and an unreachable
    scheduler are raised (`preflight`) before anything is written. SIGTERM stops the run as
    Ctrl-C does (Terminated), written in the run's log. A run that keeps no row completes with
    an empty dataset and a warning naming the stage that kept nothing."""
    names = parse_stages(stages)
    run_url = resolve_run_url(config, run_dir)
    preflight(config, names, scheduler)
    preload = worker_preload(names)
    with _sigterm_interrupts(), holding(run_url, "laionface run", force):
        run = RunFolder(run_url)
        run.start(config)
        with _RunLog(run), open_client(config, run.url, scheduler, workers, preload) as client:
            log.info("run folder: %s", run.url)
            funnel = run_stages(config, run, client, names, progress, options)
            warning = empty_result_warning(funnel, names)
            if warning:
                log.warning("%s", warning)
    return run
