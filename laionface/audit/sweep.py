"""`laionface sweep RUN --grid select.KEY=V1,V2,...`: what select and dedup would keep at every
combination of `[select]` thresholds, from the recorded detections only (nothing is re-detected,
nothing is written).

Select: every detection >= faces.record_threshold is in faces/NNNNN.parquet, so each image's fate
at each grid point is `selection.decide` on its recorded row: exact for any select thresholds
(a threshold below faces.record_threshold sees only the recorded detections, as select would).

Dedup: dedup/decisions.parquet holds one row per image the run's select kept, `cluster` = the row
of its keeper. At a grid point the survivors are the images select keeps there:
- a survivor alone in its recorded cluster is kept; an eval_overlap survivor is dropped;
- a cluster whose members all survive keeps its recorded keeper;
- a cluster that lost members is decided again among its survivors with dedup's own rules
  (`stages.dedup.decide.decide`: the keeper rule, and the links among those survivors only, so a
  chain A-B-C whose B is gone splits as a re-run would split it). Two survivors in different
  recorded clusters were never linked, so nothing else can change.
So wherever every survivor was a survivor of the run's select, the figure after dedup equals what
`laionface run --stages select,dedup,emit` gives. A survivor the run's select dropped was never
compared with anything: at such a point (looser thresholds; or, with max_faces set, a higher
min_score, which counts fewer faces as too many) the figure after dedup is not known, and the
sweep gives an upper bound (each such image kept on its own) and says so.

Scale: each raw shard is read by a per-shard function (audit.sweep_shard, mapped like the funnel's
reads: local threads, or the cluster) that returns counts per grid point; the driver holds those,
plus the members of recorded clusters of two or more images (what the re-decision needs: their
dedup samples row and their fate at each point).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from laionface.audit.model import AuditError
from laionface.audit.read import num_rows, recorded_settings, run_config
from laionface.audit.shards import Mapper, dask_mapper, local_mapper
from laionface.audit.sweep_shard import shard_clusters, sweep_shard
from laionface.config import ConfigError, DedupSection, SelectSection, apply_overrides
from laionface.io import storage
from laionface.io.schemas import DEDUP_SAMPLES
from laionface.layout import RunLayout, shard_of_file
from laionface.stages.dedup import hashindex
from laionface.stages.dedup.decide import decide
from laionface.stages.dedup.reference import combine_reference
from laionface.stages.dedup.samples import u64
from laionface.stages.dedup.search import no_pairs, search_memory

SECTION = "select"
# The grid `laionface sweep` and the report use when none is given (the run's own value is
# added to each key's values).
DEFAULT_GRID = {"min_score": (0.8, 0.9, 0.95), "min_face_size": (32, 64, 128)}
MAX_POINTS = 400
# Dedup's state in a run: decisions recorded, every dedup setting off (emit publishes select's
# output), or no decisions yet.
RECORDED, OFF, MISSING = "recorded", "off", "missing"


@dataclass(frozen=True)
class Grid:
    """The select settings of the run (`base`) and the values each varied key takes."""

    base: dict[str, Any]
    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]

    def points(self) -> list[dict[str, Any]]:
        """Every combination, the first key varying slowest."""
        return [
            dict(zip(self.keys, combo, strict=True)) for combo in itertools.product(*self.values)
        ]

    def rules(self) -> list[dict[str, Any]]:
        """The whole [select] section at each point."""
        return [{**self.base, **point} for point in self.points()]


def _parse_values(key: str, raw: str, base: dict[str, Any]) -> tuple[Any, ...]:
    """The values of one `--grid select.KEY=V1,V2`, each read as a --set value, validated."""
    values = []
    for item in raw.split(","):
        item = item.strip()
        try:
            data = apply_overrides({SECTION: dict(base)}, [f"{key}={item}"])
            section = SelectSection.model_validate(data[SECTION])
        except ConfigError as exc:  # its message starts with the --set option
            raise ConfigError(f"--grid {key}={item}: {str(exc).split(': ', 1)[-1]}") from None
        except ValidationError as exc:
            reason = "; ".join(e["msg"] for e in exc.errors())
            raise ConfigError(f"--grid {key}={item}: {reason}") from None
        values.append(getattr(section, key.split(".", 1)[1]))
    return tuple(dict.fromkeys(values))


def parse_grid(specs: list[str], base: dict[str, Any]) -> Grid:
    """The grid of `--grid select.KEY=V1,V2,...` options (each value TOML or a bare word, `none`
    for an optional key), over the run's select settings `base`; ConfigError naming the option
    when a key is not a select key, is given twice, or a value does not validate. No option:
    DEFAULT_GRID with the run's own values."""
    if not specs:
        return default_grid(base)
    keys: list[str] = []
    values: list[tuple[Any, ...]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        section, _, name = key.partition(".")
        if not sep or section != SECTION or name not in SelectSection.model_fields:
            allowed = ", ".join(f"{SECTION}.{k}" for k in SelectSection.model_fields)
            raise ConfigError(
                f"--grid {spec!r}: expected select.KEY=V1,V2,... with KEY one of {allowed},"
                " e.g. --grid select.min_score=0.8,0.9,0.95"
            )
        if name in keys:
            raise ConfigError(f"--grid {key} is given twice: list its values once, comma-separated")
        keys.append(name)
        values.append(_parse_values(key, raw, base))
    grid = Grid(dict(base), tuple(keys), tuple(values))
    size = int(np.prod([len(v) for v in values]))
    if size > MAX_POINTS:
        raise ConfigError(f"--grid: {size:,} combinations; at most {MAX_POINTS} at once")
    return grid


def default_grid(base: dict[str, Any]) -> Grid:
    keys = tuple(DEFAULT_GRID)
    values = tuple(tuple(sorted({*DEFAULT_GRID[k], base[k]})) for k in keys)
    return Grid(dict(base), keys, values)


def run_select_settings(run_url: str) -> dict[str, Any]:
    """The [select] settings the run's select stage last ran with (else the last command's)."""
    recorded = recorded_settings(run_url, SECTION).get(SECTION) or run_config(run_url).get(SECTION)
    if recorded is None:
        raise AuditError(f"{run_url}: run.json records no select settings; run the select stage")
    return SelectSection.model_validate(recorded).model_dump()


def run_dedup_settings(run_url: str) -> DedupSection:
    recorded = recorded_settings(run_url, "dedup").get("dedup") or run_config(run_url).get("dedup")
    return DedupSection.model_validate(recorded or {})


def _decide_among(samples: pa.Table, faces: np.ndarray, cfg: DedupSection) -> tuple[int, int]:
    """(images kept, their counted faces) when dedup decides `samples` (DEDUP_SAMPLES rows
    sorted by key, with no reference: eval_overlap images are not among them)."""
    phash, has_phash = u64(samples["phash"])
    searching = cfg.max_distance > 0 and cfg.near
    pairs = (
        search_memory(hashindex.distinct(phash[has_phash]), cfg.max_distance)
        if searching
        else no_pairs()
    )
    decisions = decide(samples, combine_reference([]), pairs, cfg)
    kept = decisions["kept"].to_numpy(zero_copy_only=False)
    return int(kept.sum()), int(faces[kept].sum())


@dataclass
class _Members:
    """The members of recorded clusters of two or more images, over every shard, by key."""

    samples: pa.Table
    cluster: np.ndarray
    keeper: np.ndarray
    survive: np.ndarray
    counted: np.ndarray

    @classmethod
    def of(cls, parts: list[dict], points: int) -> _Members:
        parts = [p for p in parts if p is not None]
        if not parts:
            empty = np.zeros((0, points))
            return cls(
                DEDUP_SAMPLES.empty_table(),
                np.zeros(0, np.int64),
                np.zeros(0, bool),
                empty.astype(bool),
                empty.astype(np.int64),
            )
        samples = pa.concat_tables(p["samples"] for p in parts)
        order = pc.sort_indices(samples["key"]).to_numpy()
        stack = {
            k: np.concatenate([p[k] for p in parts])[order]
            for k in ("cluster", "keeper", "survive", "counted")
        }
        return cls(samples.take(pa.array(order)), **stack)

    def decide(self, point: int, cfg: DedupSection) -> tuple[int, int]:
        """(clusters' images kept after dedup, their faces) at grid point `point`."""
        if not self.cluster.size:
            return 0, 0
        _, label = np.unique(self.cluster, return_inverse=True)
        survive = self.survive[:, point]
        whole = np.bincount(label, weights=survive) == np.bincount(label)
        kept = int(whole.sum())
        faces = int(self.counted[self.keeper & whole[label], point].sum())
        lost = np.flatnonzero(survive & ~whole[label])
        if lost.size:
            more, more_faces = _decide_among(
                self.samples.take(pa.array(lost)), self.counted[lost, point], cfg
            )
            kept, faces = kept + more, faces + more_faces
        return kept, faces


@dataclass
class SweepPoint:
    """One grid point's figures; `dedup_kept` None where not known (see `unhashed`)."""

    settings: dict[str, Any]
    select_kept: int
    select_faces: int
    dropped: dict[str, int]
    dedup_kept: int | None = None
    dedup_faces: int | None = None
    unhashed: int = 0  # images kept here that the run's select dropped: dedup never saw them
    dedup_kept_at_most: int | None = None
    is_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = {f"{SECTION}.{k}": v for k, v in self.settings.items()}
        out.update({k: v for k, v in vars(self).items() if k != "settings"})
        out["exact"] = self.dedup_kept is not None
        return out


@dataclass
class Sweep:
    run_url: str
    grid: Grid
    images: int
    dedup: str  # RECORDED, OFF or MISSING
    points: list[SweepPoint] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_url,
            "images": self.images,
            "run_select": {f"{SECTION}.{k}": v for k, v in self.grid.base.items()},
            "grid": {
                f"{SECTION}.{k}": list(v)
                for k, v in zip(self.grid.keys, self.grid.values, strict=True)
            },
            "dedup": self.dedup,
            "points": [p.as_dict() for p in self.points],
        }


def _dedup_plan(layout: RunLayout, raws: list[str], mapper: Mapper) -> list[dict]:
    """Per raw shard: its first row in the decisions and the clusters of two or more images
    whose keeper lies in it."""
    url = layout.dedup_decisions
    parts = mapper(shard_clusters, [{"decisions_url": url, "raw": raw} for raw in raws])
    starts = np.concatenate([[0], np.cumsum([p["rows"] for p in parts])]).astype(np.int64)
    if starts[-1] != num_rows(url):
        raise AuditError(
            f"{url}: {num_rows(url):,} decisions, {int(starts[-1]):,} of them for the raw shards"
            " in faces/; re-run dedup (laionface run PIPELINE --stages dedup)"
        )
    shared = np.unique(np.concatenate([p["clusters"] for p in parts] or [np.zeros(0, np.int64)]))
    return [
        {"first_row": int(start), "shared": shared[(shared >= start) & (shared < end)]}
        for start, end in zip(starts[:-1], starts[1:], strict=True)
    ]


def _dedup_state(layout: RunLayout, run_url: str) -> str:
    if not run_dedup_settings(run_url).enabled:
        return OFF
    return RECORDED if storage.exists(layout.dedup_decisions) else MISSING


def sweep(run_url: str, grid_specs: list[str] | None = None, client: Any = None) -> Sweep:
    """The sweep of the run at `run_url` over `--grid` options `grid_specs` (none: DEFAULT_GRID);
    the per-shard reads run on the cluster behind `client`, else on threads here."""
    run_url = run_url.rstrip("/")
    layout = RunLayout(run_url)
    raws = [shard_of_file(u) for u in storage.list_files(layout.faces_folder, ".parquet")]
    if not raws:
        raise AuditError(f"{run_url}: no faces/ shards: the sweep needs the faces stage's output")
    base = run_select_settings(run_url)
    grid = parse_grid(list(grid_specs or []), base)
    mapper = local_mapper if client is None else dask_mapper(client)
    state = _dedup_state(layout, run_url)
    plan = (
        _dedup_plan(layout, raws, mapper)
        if state == RECORDED
        else [{"first_row": None}] * len(raws)
    )
    rules = grid.rules()
    kwargs = [
        dict(run_url=run_url, raw=raw, rules=rules, **part)
        for raw, part in zip(raws, plan, strict=True)
    ]
    parts = mapper(sweep_shard, kwargs)
    result = Sweep(run_url, grid, sum(p["images"] for p in parts), state)
    result.points = _points(grid, parts, state, run_dedup_settings(run_url))
    return result


def _points(grid: Grid, parts: list[dict], state: str, cfg: DedupSection) -> list[SweepPoint]:
    kept, faces = sum(p["kept"] for p in parts), sum(p["faces"] for p in parts)
    points = []
    for j, settings in enumerate(grid.points()):
        dropped = Counter()
        for part in parts:
            dropped.update(part["dropped"][j])
        point = SweepPoint(
            settings,
            int(kept[j]),
            int(faces[j]),
            dict(sorted(dropped.items())),
            is_run=all(grid.base[k] == v for k, v in settings.items()),
        )
        if state == OFF:
            point.dedup_kept, point.dedup_faces = point.select_kept, point.select_faces
        points.append(point)
    if state == RECORDED:
        _dedup_figures(points, [p["dedup"] for p in parts], cfg)
    return points


def _dedup_figures(points: list[SweepPoint], parts: list[dict], cfg: DedupSection) -> None:
    members = _Members.of([p["members"] for p in parts], len(points))
    alone, alone_faces = sum(p["alone"] for p in parts), sum(p["alone_faces"] for p in parts)
    unhashed = sum(p["unhashed"] for p in parts)
    for j, point in enumerate(points):
        clustered, clustered_faces = members.decide(j, cfg)
        known = int(alone[j]) + clustered
        point.unhashed = int(unhashed[j])
        if point.unhashed:
            point.dedup_kept_at_most = known + point.unhashed
        else:
            point.dedup_kept, point.dedup_faces = known, int(alone_faces[j]) + clustered_faces


def _value(value: Any) -> str:
    return "none" if value is None else str(value)


def _after_dedup(point: SweepPoint) -> list[str]:
    if point.dedup_kept is not None:
        return [f"{point.dedup_kept:,}", f"{point.dedup_faces:,}"]
    if point.dedup_kept_at_most is not None:
        return [f"<= {point.dedup_kept_at_most:,} *", "?"]
    return ["-", "-"]


def format_table(result: Sweep) -> str:
    """The sweep as aligned text: one line per grid point, the run's own marked."""
    lines = [[f"{SECTION}.{k}" for k in result.grid.keys]]
    lines[0] += ["select kept", "faces", "after dedup", "faces"]
    for point in result.points:
        cells = [_value(v) for v in point.settings.values()]
        lines.append(cells + [f"{point.select_kept:,}", f"{point.select_faces:,}"])
        lines[-1] += _after_dedup(point)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = []
    for line, point in zip(lines, [None, *result.points], strict=True):
        cells = [cell.rjust(width) for cell, width in zip(line, widths, strict=True)]
        text.append("  ".join(cells) + ("  (the run's)" if point and point.is_run else ""))
    return "\n".join(text)


def notes(result: Sweep) -> list[str]:
    """What the figures after dedup mean for this run (the table's footnotes)."""
    out = []
    if result.dedup == OFF:
        out.append("dedup is off in this run: emit publishes what select keeps.")
    elif result.dedup == MISSING:
        out.append("the run has no dedup decisions yet: no figures after dedup.")
    if any(p.dedup_kept is None and p.dedup_kept_at_most is not None for p in result.points):
        out.append(
            "* some images kept there were dropped by the run's select (looser thresholds, or"
            " fewer faces over max_faces), so dedup never compared them: the figure is an upper"
            " bound (each such image kept), the faces unknown. Re-run select and dedup there"
            " for the exact one."
        )
    return out


def sweep_command(
    run_url: str,
    grid_specs: list[str] | None = None,
    as_json: bool = False,
    scheduler: str = "",
    out: TextIO | None = None,
) -> int:
    """`laionface sweep RUN [--grid ...] [--json] [--scheduler ADDRESS]`: 0, or 1 when the run
    can't be read (the error printed)."""
    out = out or sys.stdout
    try:
        result = _sweep_with(run_url, grid_specs, scheduler)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result.as_dict(), indent=2), file=out)
        return 0
    base = ", ".join(f"{k}={_value(v)}" for k, v in result.grid.base.items())
    print(f"run: {result.run_url} ({result.images:,} images with recorded detections)", file=out)
    print(f"the run's select: {base}", file=out)
    print(format_table(result), file=out)
    for line in notes(result):
        print(line, file=out)
    return 0


def _sweep_with(run_url: str, grid_specs: list[str] | None, scheduler: str) -> Sweep:
    if not scheduler:
        return sweep(run_url, grid_specs)
    from laionface.config import Config
    from laionface.engine.cluster import open_client

    with open_client(Config(), run_url, scheduler=scheduler) as client:
        return sweep(run_url, grid_specs, client)
