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
from collections.abc import Callable
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
    ) -> dict[str, dict]:
        """Run `fn(**task.kwargs)` for every task whose marker is not current.

        settings: JSON-able values that shape the output (default: the stage's declared
        settings); resources: Dask resources each task needs (default: the stage's). Returns the
        stats of every complete shard (earlier runs included). Shards that still fail after
        `cluster.retries` retries are recorded and raised as StageFailed once all others
        have finished. local: run the tasks here, one after the other, without retries, their
        errors raised as they are: for a step whose errors are the user's to fix at once.
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
            failures, items = self._submit(step, fn, todo, settings_fp, resources, done, unit)
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
    ) -> tuple[dict[str, str], int]:
        """Run the tasks; fill `done` with their stats; returns (failures, items made)."""
        from distributed import as_completed

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
        bar = tqdm(
            total=len(todo) + len(done),
            initial=len(done),
            desc=step,
            unit="shard",
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        failures: dict[str, str] = {}
        items = 0
        started = time.perf_counter()
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
        return failures, items

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
