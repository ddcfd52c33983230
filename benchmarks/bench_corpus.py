"""The demo corpus builder's peak memory and time at a given number of rows.

Builds `build_corpus(folder, seed, n_images=ROWS)` for each of `--rows`, each in its own process
in a new folder, and reports its wall and CPU time, its peak RSS (the child's ru_maxrss: the
builder's render threads included) and what it wrote. The builder writes each picture as soon as
it is encoded, so its peak RSS should stay flat as the rows grow (before issue 14 it held every
picture: 2.6 GB at 1,000 rows, past 23 GB at 20,000).

    python benchmarks/bench_corpus.py [--rows 20000,100000] [--seed 0] [--out DIR] [--keep]
    python benchmarks/bench_corpus.py --rows 500      # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(folder: Path, rows: int, seed: int) -> dict:
    """One build in a child process: wall and CPU time, peak RSS, files and bytes written."""
    code = (
        "import sys; from laionface.demo.corpus import build_corpus; "
        "build_corpus(sys.argv[1], seed=int(sys.argv[2]), n_images=int(sys.argv[3]))"
    )
    load = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(folder), str(seed), str(rows)], cwd=REPO
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the build of {rows} rows failed")
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"]
    return {
        "rows": rows,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss": usage.ru_maxrss * 1024,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="20000,100000", help="comma-separated row counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="where to build (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora built")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        folder = out / f"corpus-{args.seed}-{rows}"
        shutil.rmtree(folder, ignore_errors=True)
        result = build(folder, rows, args.seed)
        results.append(result)
        print(
            f"{rows:>8,} rows: {result['wall_s']:8.1f} s, CPU {result['cpu_s']:8.1f} s, "
            f"peak RSS {result['peak_rss'] / 2**20:7.0f} MiB, {result['files']:,} files, "
            f"{result['bytes'] / 2**30:.2f} GiB (load {result['load']:.1f})",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nseed {args.seed}, {os.cpu_count()} CPUs\n")
    print("| rows | wall s | CPU s | rows/s | peak RSS MiB | files | GiB written | load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['rows'] / r['wall_s']:.0f}"
            f" | {r['peak_rss'] / 2**20:.0f} | {r['files']:,} | {r['bytes'] / 2**30:.2f} "
            f"| {r['load']:.1f} |"
        )
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
