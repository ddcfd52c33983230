"""`laionface sweep` at N images, side by side with its baseline: re-running select and dedup for
each grid point.

    python benchmarks/bench_sweep.py --images 20000            # the smoke size
    python benchmarks/bench_sweep.py --images 1000000 --workdir /data/sweep-1m

The run folder is bench_scale.py's synthetic one (its generator, imported): faces parquet with
0-20 detections per image drawn from a demo run's, planted exact and near duplicates and chains.
Select and dedup run once (the run's thresholds, bench_scale.SETTINGS); then, each a `laionface`
command measured by bench_scale.measure (wall and CPU time, peak RSS of the driver and of the
other processes):
- the sweep over GRID (3 x 3 x 2 = 18 points), on the command's threads, and with --scheduler on
  a LocalCluster of --workers processes started beside it;
- the baseline: `run --stages select,dedup` at one stricter grid point (what a user does
  without the sweep), whose time x the grid's points is what the sweep replaces.
The sweep's figures at that point are checked against the baseline run's funnel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_scale import _demo_run, generate, measure, table

GRID = [
    "select.min_score=0.8,0.9,0.95",
    "select.min_face_size=32,64,96",
    "select.min_faces=1,2",
]
STRICTER = ["select.min_score=0.9", "select.min_face_size=64"]  # a point of GRID: exact


def _run(argv: list[str], log: Path) -> str:
    """`laionface ARGV`'s standard output (its errors go to the log); exits if it fails."""
    with log.open("ab") as out:
        done = subprocess.run(
            [sys.executable, "-m", "laionface", *argv], stdout=subprocess.PIPE, stderr=out
        )
    if done.returncode != 0:
        raise SystemExit(f"laionface {' '.join(argv)} failed; see {log}")
    return done.stdout.decode()


def _scheduler(workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    """A Dask LocalCluster in a child process, its address."""
    code = (
        "import sys, time; from distributed import LocalCluster;"
        f" c = LocalCluster(n_workers={workers}, threads_per_worker=1, dashboard_address=None);"
        " print(c.scheduler_address, flush=True); time.sleep(10**6)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log.open("ab"), text=True
    )
    return proc, proc.stdout.readline().strip()


def _check(sweep_json: str, run: Path, log: Path) -> dict:
    """The sweep's figures at STRICTER against the funnel of the run made there: select's equal,
    dedup's equal (or within the bound, where the sweep says it is one)."""
    wanted = {k: float(v) for k, v in (s.split("=") for s in STRICTER)}
    point = next(
        p
        for p in json.loads(sweep_json)["points"]
        if all(p[k] == v for k, v in wanted.items()) and p["select.min_faces"] == 1
    )
    funnel = json.loads(_run(["stats", str(run), "--json"], log))
    kept = {s["stage"]: s["kept"] for s in funnel["stages"]}
    dedup_ok = (
        point["dedup_kept"] == kept["dedup"]
        if point["exact"]
        else kept["dedup"] <= point["dedup_kept_at_most"]
    )
    if point["select_kept"] != kept["select"] or not dedup_ok:
        raise SystemExit(f"the sweep says {point}, the run's funnel {kept}")
    return {"run": kept, "sweep": {k: point[k] for k in ("select_kept", "dedup_kept", "exact")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="about this many images")
    parser.add_argument("--workdir", type=Path, help="kept when given (default: a temp folder)")
    parser.add_argument("--demo-run", type=Path, help="a demo run folder (default: run one)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--workers", type=int, default=2, help="LocalCluster workers for --scheduler"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "bench.log"
    demo_run = args.demo_run or _demo_run(workdir, log)
    for old in ("run", "inputs"):
        shutil.rmtree(workdir / old, ignore_errors=True)
    pipeline, written = generate(workdir, args.images, demo_run, args.processes)
    run = workdir / "run"
    print(f"generated: {json.dumps(written)}", flush=True)
    _run(["run", str(pipeline), "--no-progress", "--stages", "select,dedup"], log)
    grid = [arg for spec in GRID for arg in ("--grid", spec)]
    points = 3 * 3 * 2
    rows = [measure("sweep (threads)", ["sweep", str(run), *grid], workdir, log)]
    cluster, address = _scheduler(args.workers, log)
    try:
        rows.append(
            measure(
                f"sweep (--scheduler, {args.workers} workers)",
                ["sweep", str(run), *grid, "--scheduler", address],
                workdir,
                log,
            )
        )
    finally:
        cluster.terminate()
        cluster.wait()
    sweep_json = _run(["sweep", str(run), *grid, "--json"], log)
    overrides = [arg for s in STRICTER for arg in ("--set", s)]
    baseline = ["run", str(pipeline), "--no-progress", "--stages", "select,dedup", *overrides]
    rows.append(measure("baseline: select,dedup at one point", baseline, workdir, log))
    checked = _check(sweep_json, run, log)
    per_point = rows[-1]["wall_s"]
    print(table(rows))
    print(
        f"\n{points} points: the baseline would take {points} x {per_point} s ="
        f" {points * per_point:,.1f} s; the sweep {rows[0]['wall_s']} s on threads"
        f" ({points * per_point / max(rows[0]['wall_s'], 0.1):,.1f}x),"
        f" {rows[1]['wall_s']} s on the cluster. Checked at {STRICTER}: {checked}"
    )
    if args.json:
        result = {"images": args.images, "generated": written, "points": points, "steps": rows}
        args.json.write_text(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
