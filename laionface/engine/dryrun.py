"""`laionface run --dry-run`: what a run would do, found without doing or writing anything.

It reads the inputs' footers and the run folder (run.json, the completion markers, file
listings), and says:

- the inputs (metadata.input, checked as a run checks them: `pipeline.preflight`), with their rows;
- the shards planned: the metadata stage's parts, and at most how many download shards its kept
  rows make (the filters decide how many);
- per stage, whether it runs (`--stages`), its settings that changed since it last ran, and,
  from the completion markers (engine.markers: what each shard read and wrote, under which
  settings), which shards of each of its steps the run would make and why: never made, settings
  changed, an input file changed, an output missing or changed, or an input that a shard before
  it would make again (followed from marker to marker through the files);
- the cluster it would use: a LocalCluster's size, or the scheduler (checked to answer).

What it can know: the metadata stage's parts are planned from the inputs alone (plan_parts), so
for them the answer is the runner's own. Every other step's tasks are planned from the outputs of
the steps before it, so for those the dry run answers for the shards made so far, and a stage
that reads a folder an earlier running stage would remake (Stage.reads, Stage.writes) `follows`
it: the shards that output adds are known only once it has run. A marker does not record its
task's token, so a changed token is not seen. A step whose settings are not its stage's declared
settings (metadata/parts) carries, after those changed, "settings changed (if this step reads
them)": which of them it reads is the stage's own knowledge.

Nothing is written: no run folder, no lease, no log, no cluster started.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from laionface.config import Config
from laionface.engine import markers
from laionface.engine.pipeline import parse_stages, preflight, resolve_run_url, stage_of
from laionface.engine.runfolder import RunFolder
from laionface.io import storage
from laionface.layout import STAGE_ORDER, RunLayout
from laionface.stages.metadata.inputs import InputFile
from laionface.stages.metadata.stage import TASK_ROWS, plan_parts

# The metadata stage's step whose tasks come from the inputs alone.
PARTS_STEP = "metadata/parts"
# Shards named per reason in the text (the rest are counted).
EXAMPLES = 5
NEVER_MADE = "never made"
SETTINGS_CHANGED = "settings changed"


@dataclass
class StepPlan:
    """One step of a stage: its shards (planned: `exact`; else those with a marker) and the ones
    the run would make, {shard: (reason, detail)}."""

    step: str
    shards: list[str]
    make: dict[str, tuple[str, str]] = field(default_factory=dict)
    exact: bool = False
    found: dict[str, dict] = field(default_factory=dict, repr=False)  # shard: its marker

    @property
    def complete(self) -> int:
        return len(self.shards) - len(self.make)


@dataclass
class StagePlan:
    """A stage: whether it runs, its settings that changed since it last ran, its steps, and the
    running stage before it whose output it reads and that would remake some (`follows`: its
    tasks are planned from that output, so new ones are known only once that stage has run)."""

    stage: str
    runs: bool
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key: (last run, now)
    steps: list[StepPlan] = field(default_factory=list)
    ran_before: bool = False
    follows: str = ""

    @property
    def would_make(self) -> bool:
        return not self.ran_before or bool(self.follows) or any(s.make for s in self.steps)


@dataclass
class DryRun:
    run_url: str
    run_exists: bool
    lease: bool  # a lease.json is in the folder: another command may be writing it
    cluster: str
    inputs: list[InputFile]
    parts: int
    rows_per_shard: int
    stages: list[StagePlan]

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)

    def step(self, name: str) -> StepPlan:
        return next(step for s in self.stages for step in s.steps if step.step == name)

    def text(self) -> str:
        return "\n".join(_text(self))


def flat_settings(settings: Any, prefix: str = "") -> dict[str, Any]:
    """{"select.min_score": 0.9, ...} of a stage's settings ({"select": {"min_score": 0.9}})."""
    if not isinstance(settings, dict) or (prefix and not settings):
        return {prefix: settings}
    out: dict[str, Any] = {}
    for key, value in settings.items():
        out.update(flat_settings(value, f"{prefix}.{key}" if prefix else key))
    return out


def _changed_settings(record: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    if "settings" not in record:
        return {}
    last, current = flat_settings(record["settings"]), flat_settings(now)
    return {
        key: (last.get(key), current.get(key))
        for key in sorted(set(last) | set(current))
        if last.get(key) != current.get(key)
    }


def _candidates(layout: RunLayout, name: str) -> tuple[str, ...]:
    """Where a file a marker names may be: names inside the run folder are relative to it, and
    a relative path outside it (an input given relative to the working folder) is kept as is."""
    if "://" in name or name.startswith("/"):
        return (name,)
    return (layout.path(name), name)


def _changed_file(layout: RunLayout, recorded: dict, versions: dict) -> tuple[str, str] | None:
    """The first file of `recorded` ({name: version}) whose version is no longer the one
    recorded: (name, "missing" or "changed")."""
    for name, version in sorted(recorded.items()):
        now = [versions.get(url) for url in _candidates(layout, name)]
        if version not in now:
            return name, "missing" if not any(now) else "changed"
    return None


@dataclass(frozen=True)
class _Settings:
    """The settings fingerprint a step's shards must carry now (None: unknown, `unknown` says
    why), and what a shard under other settings is said to be."""

    fingerprint: str | None
    other: str
    unknown: str = ""


def _marker_reason(
    layout: RunLayout, marker: dict, settings: _Settings, versions: dict
) -> tuple[str, str] | None:
    """Why the runner would make this marker's shard again (None: it is complete), from what the
    marker records: its format, settings, outputs and inputs."""
    if marker.get("format") != markers.MARKER_FORMAT:
        return "made by another laionface version", ""
    if settings.fingerprint is not None and marker.get("settings") != settings.fingerprint:
        return settings.other, ""
    output = _changed_file(layout, marker.get("outputs") or {}, versions)
    if output:
        return f"output {output[1]}", output[0]
    source = _changed_file(layout, marker.get("inputs") or {}, versions)
    if source:
        return f"input {source[1]}", source[0]
    return None


def _step_names(state: dict, stage: str) -> list[str]:
    """The steps of `stage` that run.json records (a step's record counts its shards)."""
    return sorted(
        name
        for name, record in state.get("stages", {}).items()
        if (name == stage or name.startswith(f"{stage}/")) and "shards_total" in record
    )


def _step_settings(state: dict, stage: str, step: str, now: str, changed: bool) -> _Settings:
    """The settings fingerprint the step's shards must carry now (`now`: its stage's declared
    settings'), when it can be known: a step that ran with its stage's declared settings carries
    `now`; one with settings of its own (metadata/parts) carries the same as when it last ran,
    unless the stage's settings have `changed` since."""
    records = state.get("stages", {})
    other = SETTINGS_CHANGED if changed else "made under other settings"
    last = records.get(step, {}).get("fingerprint")
    if last is None:
        return _Settings(None, other, "no record of its settings in run.json")
    if last == records.get(stage, {}).get("fingerprint"):
        return _Settings(now, other)
    if changed:
        return _Settings(None, other, f"{SETTINGS_CHANGED} (if this step reads them)")
    return _Settings(last, other)


def _plan_step(
    layout: RunLayout, step: str, found: dict[str, dict], settings: _Settings, versions: dict
) -> StepPlan:
    plan = StepPlan(step, sorted(found), found=found)
    for shard, marker in sorted(found.items()):
        reason = _marker_reason(layout, marker, settings, versions)
        if reason is None and settings.fingerprint is None:
            reason = (settings.unknown, "")
        if reason:
            plan.make[shard] = reason
    return plan


def _plan_parts(
    layout: RunLayout, inputs: list[InputFile], found: dict, settings: _Settings, versions: dict
) -> StepPlan:
    """The metadata stage's parts, exactly as it plans them, each checked like the runner."""
    parts = plan_parts(inputs, TASK_ROWS)
    known = {p.id: p.source for p in parts}
    made = {part: marker for part, marker in found.items() if part in known}
    plan = _plan_step(layout, PARTS_STEP, made, settings, versions)
    plan.shards, plan.exact = list(known), True
    for part, source in known.items():
        marker = found.get(part)
        if marker is None:
            plan.make[part] = (NEVER_MADE, "")
        elif layout.relative(source) not in (marker.get("inputs") or {}):
            plan.make[part] = ("planned from another input file", source)
    return plan


def _markers_of(layout: RunLayout, steps: Iterable[str]) -> dict[str, dict[str, dict]]:
    return {step: markers.read_markers(layout.markers(step)) for step in steps}


def _versions(layout: RunLayout, found: dict[str, dict[str, dict]], inputs: list[InputFile]):
    """The version of every file the markers name, and of the inputs, in one listing per folder."""
    urls = [f.url for f in inputs]
    for per_step in found.values():
        for marker in per_step.values():
            for name in (*(marker.get("inputs") or {}), *(marker.get("outputs") or {})):
                urls += _candidates(layout, name)
    return storage.file_versions(urls)


def _files(plan: StepPlan, kind: str) -> Iterable[tuple[str, str]]:
    """(shard, file) of the files its markers record as read ("inputs") or made ("outputs")."""
    for shard, marker in plan.found.items():
        for name in marker.get(kind) or {}:
            yield shard, name


def _in_order(steps: list[StepPlan]) -> list[StepPlan]:
    """A stage's steps in the order they run: each after the steps whose outputs it reads."""
    made_by = {name: step.step for step in steps for _, name in _files(step, "outputs")}
    reads = {
        step.step: {made_by[n] for _, n in _files(step, "inputs") if n in made_by} - {step.step}
        for step in steps
    }
    depth: dict[str, int] = {}

    def depth_of(step: str, seen: frozenset[str]) -> int:
        if step not in depth:
            before = [depth_of(s, seen | {step}) for s in reads[step] if s not in seen]
            depth[step] = 1 + max(before, default=-1)
        return depth[step]

    return sorted(steps, key=lambda step: (depth_of(step.step, frozenset()), step.step))


def _plan_stage(
    config: Config, run: RunFolder, name: str, runs: bool, inputs: list[InputFile]
) -> StagePlan:
    stage = stage_of(name)
    record = run.state.get("stages", {}).get(name, {})
    changed = _changed_settings(record, stage.settings_of(config))
    plan = StagePlan(name, runs, changed, ran_before=record.get("status") == "done")
    steps = _step_names(run.state, name)
    if name == "metadata" and PARTS_STEP not in steps:
        steps.insert(0, PARTS_STEP)
    found = _markers_of(run.layout, steps)
    versions = _versions(run.layout, found, inputs if name == "metadata" else [])
    now = stage.fingerprint(config)
    for step in steps:
        settings = _step_settings(run.state, name, step, now, bool(changed))
        if step == PARTS_STEP:
            plan.steps.append(_plan_parts(run.layout, inputs, found[step], settings, versions))
        else:
            plan.steps.append(_plan_step(run.layout, step, found[step], settings, versions))
    plan.steps = _in_order(plan.steps)
    return plan


def _propagate(stages: list[StagePlan]) -> None:
    """A shard that reads a file another shard of the run would make again is made again too
    (the file's version changes): followed from shard to shard through the markers' inputs and
    outputs, over the stages that run."""
    steps = [step for stage in stages if stage.runs for step in stage.steps]
    made_by = {
        name: (step.step, shard) for step in steps for shard, name in _files(step, "outputs")
    }
    remade = {(step.step, shard) for step in steps for shard in step.make}
    changed = True
    while changed:
        changed = False
        for step in steps:
            for shard, name in _files(step, "inputs"):
                source = made_by.get(name)
                if shard not in step.make and source in remade:
                    step.make[shard] = (f"input made again by {source[0]}", name)
                    remade.add((step.step, shard))
                    changed = True


def _mark_follows(stages: list[StagePlan]) -> None:
    """`follows`: the first running stage before a stage that would make a folder it reads
    (Stage.reads, Stage.writes) anew; its tasks are planned from that folder."""
    remade: dict[str, str] = {}  # run-folder folder: the stage that would make it anew
    for plan in stages:
        if not plan.runs:
            continue
        declared = stage_of(plan.stage)
        plan.follows = next((remade[f] for f in declared.reads if f in remade), "")
        if plan.would_make:
            remade.update({folder: remade.get(folder, plan.stage) for folder in declared.writes})


def _cluster(config: Config, run_url: str, scheduler: str, workers: int | None) -> str:
    address = scheduler or config.cluster.scheduler
    if address:
        return f"the Dask scheduler at {address} (it answers)"
    section = config.cluster
    kind = "threads" if storage.is_process_local(run_url) else "processes"
    return (
        f"a LocalCluster on this machine: {workers or section.workers} worker {kind} x "
        f"{section.threads_per_worker} thread(s), memory_limit {section.memory_limit}, "
        f"dashboard {section.dashboard_address or 'off'}"
    )


def dry_run(
    config: Config,
    run_dir: str | None = None,
    stages: str | Iterable[str] | None = None,
    scheduler: str = "",
    workers: int | None = None,
) -> DryRun:
    """What `run_pipeline` with these arguments would do; raises what it would raise before
    starting (bad stages, inputs or scheduler). Reads only; writes nothing."""
    names = parse_stages(stages)
    run_url = resolve_run_url(config, run_dir).rstrip("/")
    inputs = preflight(config, names, scheduler)
    run = RunFolder(run_url)  # reads run.json if there is one; creates nothing
    plans = [
        _plan_stage(config, run, name, name in names, inputs if name == "metadata" else [])
        for name in STAGE_ORDER
    ]
    _propagate(plans)
    _mark_follows(plans)
    return DryRun(
        run_url=run_url,
        run_exists=storage.exists(run.layout.run_json),
        lease=storage.exists(run.layout.lease),
        cluster=_cluster(config, run_url, scheduler, workers),
        inputs=inputs,
        parts=len(plan_parts(inputs, TASK_ROWS)) if inputs else 0,
        rows_per_shard=config.metadata.rows_per_shard,
        stages=plans,
    )


# ---------------------------------------------------------------------------------------------
# The text


def _reasons_text(make: dict[str, tuple[str, str]]) -> list[str]:
    by_reason: dict[str, list[str]] = {}
    for shard, (reason, detail) in sorted(make.items()):
        by_reason.setdefault(reason, []).append(f"{shard} ({detail})" if detail else shard)
    lines = []
    for reason, shards in by_reason.items():
        more = f", ... {len(shards) - EXAMPLES} more" if len(shards) > EXAMPLES else ""
        lines.append(f"      {reason}: {len(shards)}: {', '.join(shards[:EXAMPLES])}{more}")
    return lines


def _step_text(step: StepPlan) -> list[str]:
    kind = "planned" if step.exact else "made so far"
    head = f"    {step.step}: {len(step.shards)} shard(s) {kind}, {step.complete} complete"
    head += f", {len(step.make)} to make" if step.make else ": nothing to make"
    return [head, *_reasons_text(step.make)]


def _stage_text(stage: StagePlan) -> list[str]:
    if not stage.runs:
        return [f"  {stage.stage}: skipped (not in --stages)"]
    state = "runs"
    if not stage.ran_before:
        state += " (it has not completed in this run folder before)"
    elif not stage.would_make:
        state += ": every shard is complete, nothing to make"
    lines = [f"  {stage.stage}: {state}"]
    if stage.follows and stage.ran_before:
        lines.append(
            f"    it reads what {stage.follows} would make anew: shards that output adds are "
            f"known only once {stage.follows} has run"
        )
    if stage.changed:
        changes = ", ".join(f"{k} {last!r} -> {now!r}" for k, (last, now) in stage.changed.items())
        lines.append(f"    settings changed since its last run: {changes}")
    for step in stage.steps:
        lines += _step_text(step)
    return lines


def _text(plan: DryRun) -> list[str]:
    rows = sum(f.num_rows for f in plan.inputs)
    lines = ["dry run: nothing is written (no run folder, no lease, no log, no cluster started)"]
    folder = "exists" if plan.run_exists else "does not exist yet: the run would create it"
    lines.append(f"run folder: {plan.run_url} ({folder})")
    if plan.lease:
        lines.append(
            "  it holds a lease.json: another command may be writing it (the run would stop "
            "unless that lease is stale)"
        )
    lines.append(f"cluster: {plan.cluster}")
    if plan.inputs:
        lines.append(f"inputs (metadata.input): {len(plan.inputs)} file(s), {rows:,} rows")
        lines += [
            f"  {f.url}: {f.num_rows:,} rows in {len(f.row_group_rows)} row group(s)"
            for f in plan.inputs
        ]
        shards = math.ceil(rows / plan.rows_per_shard)
        lines.append(
            f"planned: {plan.parts} metadata part(s) ({PARTS_STEP}), then at most {shards:,} "
            f"download shard(s) of {plan.rows_per_shard:,} rows (the filters decide how many)"
        )
    lines.append("stages:")
    for stage in plan.stages:
        lines += _stage_text(stage)
    return lines
