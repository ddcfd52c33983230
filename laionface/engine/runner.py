"""Maps a stage's plain per-shard function over shards on a dask.distributed cluster.

The executor is kept apart from the stages (as in datatrove): a stage only knows its per-shard
function, the shards it has and which files each reads and writes (`ShardTask`); this module
decides where they run, skips shards that are still complete (`engine.markers`: settings, input
versions and outputs unchanged), retries failures, records the ones that still fail, and shows
progress. A shard function is a plain, picklable function of keyword arguments that returns
JSON-able stats ("items" feeds the progress rate); it writes its outputs atomically.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from laionface.engine import markers
from laionface.engine.runfolder import RunFolder
from laionface.io import storage
from laionface.layout import RunLayout

if TYPE_CHECKING:
    from laionface.config import Config
    from laionface.engine.stage import Stage

log = logging.getLogger("laionface")


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: `fn(**kwargs)` makes shard `shard` of a step.

    inputs: the files it reads (a new version of any redoes it); outputs: the files it writes
    (one missing or changed since redoes it); token: a digest of anything else it reads that is
    not a whole file, such as its slice of a plan.
    """

    shard: str
    kwargs: dict[str, Any]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    token: str = ""


class StageFailed(RuntimeError):
    """Some shards still failed after their retries; the others are complete.

    `killed`: the shards among them whose worker process died while running them (killed for
    memory, a crash), which a stage may split to find the one input that kills."""

    def __init__(self, step: str, failures: dict[str, str], killed: frozenset[str] = frozenset()):
        self.step = step
        self.failures = failures
        self.killed = killed
        lines = [f"  {shard}: {error}" for shard, error in sorted(failures.items())]
        super().__init__(
            f"stage {step}: {len(failures)} shard(s) failed after retries:\n"
            + "\n".join(lines)
            + "\nRe-run the same command to retry only these shards."
        )


def _run_shard(
    fn: Callable[..., dict],
    kwargs: dict,
    marker_url: str,
    run_url: str,
    fingerprint: str,
    settings_fp: str,
    inputs: dict[str, str | None],
    outputs: tuple[str, ...],
) -> dict:
    """Runs on a worker: make the shard, then mark it complete with its outputs' versions."""
    started = time.perf_counter()
    stats = dict(fn(**kwargs) or {})
    stats.setdefault("items", 0)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    layout = RunLayout(run_url)
    made = markers.named_versions(layout, outputs, storage.file_versions(outputs))
    missing = [name for name, version in made.items() if version is None]
    if missing:
        raise RuntimeError(f"the shard function did not write {', '.join(missing)}")
    markers.write_marker(
        marker_url,
        fingerprint=fingerprint,
        settings_fp=settings_fp,
        inputs=inputs,
        outputs=made,
        stats=stats,
    )
    return stats


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


# How often the driver looks at the running shards (and the progress bar moves without news).
WATCH_SECONDS = 2.0


# A worker not heard from for this long is stuck (its heartbeats come every second or so):
# the task it runs starts counting towards its deadline, executing or not as far as the
# scheduler knows (a task that wedges its worker at once is never reported executing).
SILENT_SECONDS = 10.0


def _scheduler_view() -> Callable[[Any], dict[str, dict]]:
    """A function for `run_on_scheduler`: what the scheduler knows of each worker (seconds since
    its last heartbeat, the tasks it was given, those it reported executing and for how long).
    Defined in a closure so that it is pickled by value: the scheduler needs no laionface."""

    def view(dask_scheduler: Any) -> dict[str, dict]:
        import time as clock

        now = clock.time()
        return {
            address: {
                "silent": now - ws.last_seen,
                "processing": [str(ts.key) for ts in ws.processing],
                "executing": {str(ts.key): float(s) for ts, s in ws.executing.items()},
            }
            for address, ws in dask_scheduler.workers.items()
        }

    return view


class Watchdog:
    """Restarts the worker of a shard that runs past its deadline, so a task wedged in C with the
    GIL held, a stopped worker process or a deadlocked fork is retried instead of hanging the run.

    A shard's clock is the time the scheduler has seen it executing on a worker (workers report
    it in their heartbeats), or, on a worker silent for SILENT_SECONDS, the time since it went
    silent; time spent queued does not count, and the clock starts again on another worker. The
    restart goes through the worker's nanny, which kills the process whatever its threads are
    doing; the scheduler then reschedules the shard (after
    `distributed.scheduler.allowed-failures` deaths it fails as KilledWorker and is recorded).
    """

    def __init__(self, client: Any, step: str, deadline: float):
        self.client = client
        self.step = step
        self.deadline = deadline
        self.started: dict[tuple[str, str], float] = {}  # (task key, worker) -> start
        self.restarts: dict[str, int] = {}  # shard -> restarts

    def check(self, running: dict[str, str]) -> None:
        """Look at the tasks `running` ({task key: shard}); restart workers past the deadline."""
        if not self.deadline or not running:
            return
        now = time.monotonic()
        clocks = {}
        view = self.client.run_on_scheduler(_scheduler_view())
        for worker, state in view.items():
            for key in state["processing"]:
                if key not in running:
                    continue
                if key in state["executing"]:
                    start = now - state["executing"][key]
                elif state["silent"] > SILENT_SECONDS:
                    start = now
                else:
                    continue  # queued on a live worker
                clocks[(key, worker)] = min(start, self.started.get((key, worker), start))
        self.started = {}
        for (key, worker), start in clocks.items():
            if now - start > self.deadline:
                self._restart(worker, running[key], now - start)
            else:
                self.started[(key, worker)] = start

    def _restart(self, worker: str, shard: str, seconds: float) -> None:
        self.restarts[shard] = self.restarts.get(shard, 0) + 1
        log.warning(
            "%s: shard %s has run %.0f s on %s, past its deadline (%.0f s): restarting the "
            "worker; the shard will be retried",
            self.step,
            shard,
            seconds,
            worker,
            self.deadline,
        )
        try:
            self.client.restart_workers([worker], raise_for_error=True)
        except Exception as exc:  # a worker without a nanny can't be restarted from here
            log.error("%s: could not restart %s (%s): restart it by hand", self.step, worker, exc)

    def explain(self, shard: str, error: str) -> str:
        """The error of a failed shard, with the restarts that preceded it."""
        restarts = self.restarts.get(shard)
        if not restarts:
            return error
        return (
            f"{error} (its worker was restarted {restarts} time(s): past the {self.deadline:.0f} s "
            "deadline; raise cluster.task_timeout if such a shard really takes longer)"
        )


def _as_completed(futures: dict, watchdog: Watchdog) -> Iterator[Any]:
    """The futures as they finish, with the watchdog looking at the others in between."""
    from distributed import wait

    pending = set(futures)
    while pending:
        try:
            finished, pending = wait(pending, timeout=WATCH_SECONDS, return_when="FIRST_COMPLETED")
        except TimeoutError:
            finished = set()
        yield from finished
        watchdog.check({future.key: futures[future] for future in pending})


# Without a terminal to draw a bar on, a step logs its progress at most this often.
PROGRESS_LOG_SECONDS = 30.0


class _Progress:
    """A step's progress (shards done, items per second): a bar when stderr is a terminal, else
    a log line at most every `every` seconds (a bar's carriage-return frames would fill a log
    file); nothing when not `enabled`."""

    def __init__(
        self,
        step: str,
        total: int,
        initial: int,
        unit: str,
        enabled: bool,
        every: float = PROGRESS_LOG_SECONDS,
    ):
        self.step, self.unit, self.total, self.done = step, unit, total, initial
        self.items = 0
        self.started = self.logged = time.perf_counter()
        self.every = every
        self.logging = enabled and not sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=step,
            unit="shard",
            disable=not enabled or self.logging,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def add(self, items: int) -> None:
        self.items += items

    def update(self) -> None:
        self.done += 1
        now = time.perf_counter()
        rate = f"{self.items / max(now - self.started, 1e-9):,.1f} {self.unit}/s"
        self.bar.set_postfix_str(rate, refresh=False)
        self.bar.update(1)
        if self.logging and now - self.logged >= self.every and self.done < self.total:
            self.logged = now
            log.info("%s: %d/%d shards, %s", self.step, self.done, self.total, rate)

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Pending:
    """A task to run, with what its marker will record."""

    task: ShardTask
    fingerprint: str
    inputs: dict[str, str | None]


@dataclass
class StageContext:
    """What a stage's `run(ctx)` gets: the config, the run folder, the cluster, its declaration."""

    config: Config
    run: RunFolder
    client: Any  # distributed.Client
    progress: bool = True
    # Command-line switches a stage may read, e.g. {"retry_failed": True}.
    options: dict[str, Any] = field(default_factory=dict)
    stage: Stage | None = None
    failures: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def layout(self) -> RunLayout:
        return self.run.layout

    def path(self, *parts: str) -> str:
        return self.run.path(*parts)

    def settings(self) -> dict[str, Any]:
        """The current stage's declared settings (see Stage.settings_of)."""
        if self.stage is None:
            raise RuntimeError("no stage declared: pass settings= to map_shards")
        return self.stage.settings_of(self.config)

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
        settings: Any = None,
        resources: dict[str, float] | None = None,
        unit: str = "items",
        local: bool = False,
        deadline: float | None = None,
    ) -> dict[str, dict]:
        """Run `fn(**task.kwargs)` for every task whose marker is not current.

        settings: JSON-able values that shape the output (default: the stage's declared
        settings); resources: Dask resources each task needs (default: the stage's). Returns the
        stats of every complete shard (earlier runs included). Shards that still fail after
        `cluster.retries` retries are recorded and raised as StageFailed once all others
        have finished. local: run the tasks here, one after the other, without retries, their
        errors raised as they are: for a step whose errors are the user's to fix at once.
        deadline: seconds a shard may run before its worker is restarted (Watchdog; default
        cluster.task_timeout, 0 = none).
        """
        settings_fp = markers.digest(self.settings() if settings is None else settings)
        if resources is None and self.stage is not None:
            resources = self.stage.resources(self.config)
        done, todo = self._plan(step, tasks, settings_fp)
        status = self._started(step, len(tasks), len(done), settings_fp)
        started = time.perf_counter()
        if local:
            failures, items = {}, self._run_here(step, fn, todo, settings_fp, done)
        else:
            if todo and resources:
                _require_resources(self.client, resources, step)
            if deadline is None:
                deadline = self.config.cluster.task_timeout
            failures, items = self._submit(
                step, fn, todo, settings_fp, resources, done, unit, deadline
            )
        self._finished(step, status, done, failures, time.perf_counter() - started)
        log.info(
            "%s: %d/%d shards complete (%d skipped as already done), %d %s in %.1f s%s",
            step,
            len(done),
            len(tasks),
            len(tasks) - len(todo),
            items,
            unit,
            time.perf_counter() - started,
            f", {len(failures)} FAILED" if failures else "",
        )
        if failures:
            self.failures[step] = failures
            killed = frozenset(
                s for s, error in failures.items() if error.startswith("KilledWorker")
            )
            raise StageFailed(step, failures, killed)
        return done

    def _plan(
        self, step: str, tasks: list[ShardTask], settings_fp: str
    ) -> tuple[dict[str, dict], list[_Pending]]:
        """The stats of the tasks still complete, and the tasks to run."""
        found = markers.read_markers(self.layout.markers(step))
        versions = storage.file_versions(
            url for task in tasks for url in (*task.inputs, *task.outputs)
        )
        done: dict[str, dict] = {}
        todo: list[_Pending] = []
        for task in tasks:
            inputs = markers.named_versions(self.layout, task.inputs, versions)
            fingerprint = markers.fingerprint(settings_fp, inputs, task.token)
            outputs = markers.named_versions(self.layout, task.outputs, versions)
            marker = found.get(task.shard)
            if markers.is_current(marker, fingerprint, outputs):
                done[task.shard] = marker["stats"]
            else:
                todo.append(_Pending(task, fingerprint, inputs))
        return done, todo

    def _started(self, step: str, total: int, skipped: int, settings_fp: str) -> dict:
        status = self.run.stage(step)
        status.update(
            status="running",
            started=markers.now_iso(),
            shards_total=total,
            shards_skipped=skipped,
            fingerprint=settings_fp,
        )
        status.pop("failed", None)
        self.run.save()
        return status

    def _run_here(
        self, step: str, fn: Callable[..., dict], todo: list[_Pending], settings_fp: str, done: dict
    ) -> int:
        items = 0
        for pending in todo:
            task = pending.task
            marker = self.layout.marker(step, task.shard)
            done[task.shard] = _run_shard(
                fn,
                task.kwargs,
                marker,
                self.run.url,
                pending.fingerprint,
                settings_fp,
                pending.inputs,
                task.outputs,
            )
            items += int(done[task.shard].get("items", 0))
        return items

    def _submit(
        self,
        step: str,
        fn: Callable[..., dict],
        todo: list[_Pending],
        settings_fp: str,
        resources: dict[str, float] | None,
        done: dict[str, dict],
        unit: str,
        deadline: float,
    ) -> tuple[dict[str, str], int]:
        """Run the tasks; fill `done` with their stats; returns (failures, items made)."""
        futures = {}
        for pending in todo:
            task = pending.task
            future = self.client.submit(
                _run_shard,
                fn,
                task.kwargs,
                self.layout.marker(step, task.shard),
                self.run.url,
                pending.fingerprint,
                settings_fp,
                pending.inputs,
                task.outputs,
                key=f"{step}-{task.shard}-{pending.fingerprint}-{time.time_ns()}",
                retries=self.config.cluster.retries,
                resources=resources,
                pure=False,
            )
            futures[future] = task.shard
        progress = _Progress(step, len(todo) + len(done), len(done), unit, self.progress)
        watchdog = Watchdog(self.client, step, deadline)
        failures: dict[str, str] = {}
        for future in _as_completed(futures, watchdog):
            shard = futures[future]
            try:
                stats = future.result()
            except Exception as exc:  # recorded; the other shards go on
                failures[shard] = watchdog.explain(shard, f"{type(exc).__name__}: {exc}")
                log.debug("shard %s/%s failed:\n%s", step, shard, traceback.format_exc())
            else:
                done[shard] = stats
                progress.add(int(stats.get("items", 0)))
            progress.update()
        progress.close()
        return failures, progress.items

    def _finished(
        self, step: str, status: dict, done: dict, failures: dict, seconds: float
    ) -> None:
        status.update(
            status="failed" if failures else "done",
            finished=markers.now_iso(),
            seconds=round(seconds, 3),
            shards_done=len(done),
            items=sum(int(s.get("items", 0)) for s in done.values()),
        )
        if failures:
            status["failed"] = failures
        self.run.save()
