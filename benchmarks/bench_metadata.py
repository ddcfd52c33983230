"""Metadata stage vs DuckDB vs LAION-Face's own script, side by side, on a LAION-format file.

Generates (once, cached) a LAION-400M-format parquet of `--rows` rows with realistic URL and
caption lengths (snappy, row groups of `--row-group` rows, like LAION's parts) and an ID list of
12% of its SAMPLE_IDs (LAION-Face's ratio) in LAION-Face's layout: a torch.save'd list of 32
collections, the first holding this part's IDs. Then runs the same selection (ID list, NSFW in
{UNLIKELY, UNSURE}, similarity >= 0.32, min(WIDTH, HEIGHT) >= 100), each in its own process:

- laionface: `run_pipeline(..., stages="metadata")` on a LocalCluster of `--workers` processes,
  reading the ID list as parquet like DuckDB (metadata.url_schemes = [] and dedup_urls = false, so
  it does exactly the selection above); a second row reads LAION-Face's .pth (torch.load with
  weights_only=True) and keeps the defaults, which also check URL schemes and drop repeated URLs;
- duckdb: one `COPY (SELECT ... WHERE SAMPLE_ID IN (SELECT ...)) TO parquet` with `--workers`
  threads, the ID list given to it as parquet (it can't read .pth);
- laionface-face: LAION-Face's convert_parquet.py approach: torch.load the list, the whole file
  into pandas, `isin` on a Python set of the IDs, write the rows kept.

Each runs `--rounds` times, alternating; the best round of each is compared. "Work" is the
selection itself, timed inside the child (laionface: `run_pipeline(stages="metadata")` on its
already started LocalCluster, the list conversion included); "process" is the whole child
process, interpreter, imports and cluster start included. Peak RSS is the largest sum of RSS over
the child's process tree (laionface: driver, scheduler, nannies and workers), polled every 20 ms.
Every method must select the same rows, or the script fails.

    python benchmarks/bench_metadata.py [--rows 5000000] [--row-group 1000000] [--workers 2]
    python benchmarks/bench_metadata.py --rows 13000000 --only-laionface --rounds 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ID_FRACTION = 0.12  # LAION-Face: 50M of LAION-400M's 413M rows
NSFW = ["UNLIKELY", "UNSURE"]
MIN_SIMILARITY = 0.32
MIN_SIDE = 100
GENERATE_ROWS = 1_000_000  # rows generated (and held) at a time


# ---------------------------------------------------------------------------------------------
# The data


def _random_strings(rng: np.random.Generator, lengths: np.ndarray, alphabet: bytes) -> pa.Array:
    letters = np.frombuffer(alphabet, dtype=np.uint8)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = letters[rng.integers(0, len(letters), int(offsets[-1]))]
    array = pa.LargeStringArray.from_buffers(
        len(lengths), pa.py_buffer(offsets), pa.py_buffer(data)
    )
    return array.cast(pa.string())


def _pick(rng: np.random.Generator, values: list[str], n: int, p: list[float] | None = None):
    return pa.array(values, pa.string()).take(pa.array(rng.choice(len(values), n, p=p)))


def laion_rows(rng: np.random.Generator, n: int, ids: np.ndarray) -> pa.Table:
    """N LAION-400M rows: URLs ~95 chars (lognormal tail), captions ~10 Zipf-distributed words."""
    vocab = _random_strings(rng, rng.integers(2, 11, 20_000), b"abcdefghijklmnopqrstuvwxyz")
    words = np.clip(rng.poisson(10, n), 1, 60)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(words, out=offsets[1:])
    picked = vocab.take(pa.array(rng.zipf(1.3, int(offsets[-1])) % len(vocab)))
    text = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), picked), " ")
    domains = _random_strings(rng, rng.integers(6, 20, 50_000), b"abcdefghijklmnopqrstuvwxyz0-")
    domain = domains.take(pa.array(rng.zipf(1.2, n) % len(domains)))
    path_lengths = np.clip(rng.lognormal(4.0, 0.5, n).astype(np.int64), 5, 1500)
    path = _random_strings(rng, path_lengths, b"abcdefghijklmnopqrstuvwxyz0123456789/_-")
    url = pc.binary_join_element_wise(
        _pick(rng, ["https://", "http://", "https://www."], n),
        domain,
        _pick(rng, [".com", ".org", ".net", ".co.uk", ".de", ".ru", ".fr"], n),
        "/",
        path,
        _pick(rng, [".jpg", ".jpeg", ".png", ".JPG", "?w=640"], n),
        "",
    )
    return pa.table(
        {
            "SAMPLE_ID": pa.array(ids, pa.int64()),
            "URL": url,
            "TEXT": text,
            "HEIGHT": pa.array(rng.integers(16, 4000, n), pa.int32()),
            "WIDTH": pa.array(rng.integers(16, 4000, n), pa.int32()),
            "LICENSE": _pick(rng, ["?", "https://creativecommons.org/licenses/by/4.0/"], n),
            "NSFW": _pick(rng, ["UNLIKELY", "UNSURE", "NSFW"], n, [0.8, 0.15, 0.05]),
            "similarity": pa.array(rng.uniform(0.3, 0.45, n), pa.float64()),
        }
    )


def generate(folder: Path, rows: int, row_group: int, seed: int = 0) -> dict[str, Path]:
    """The parquet, the ID list (.pth in LAION-Face's layout, and .parquet for DuckDB); cached."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    stem = f"laion-{rows}-rg{row_group}-s{seed}"
    paths = {
        "data": folder / f"{stem}.parquet",
        "pth": folder / f"{stem}-ids.pth",
        "ids": folder / f"{stem}-ids.parquet",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    rng = np.random.default_rng(seed)
    # LAION's SAMPLE_IDs are unique, shuffled integers.
    all_ids = rng.permutation(rows).astype(np.int64) * 7 + 1_000_000
    temp = paths["data"].with_suffix(".tmp")
    started = time.perf_counter()
    with pq.ParquetWriter(temp, laion_rows(rng, 1, all_ids[:1]).schema, compression="snappy") as w:
        for start in range(0, rows, GENERATE_ROWS):
            chunk = all_ids[start : start + GENERATE_ROWS]
            w.write_table(laion_rows(rng, len(chunk), chunk), row_group_size=row_group)
    temp.rename(paths["data"])
    chosen = np.sort(rng.choice(all_ids, int(rows * ID_FRACTION), replace=False))
    # LAION-Face's laion_face_ids.pth: 32 collections of Python ints, one per LAION-400M part.
    torch.save([chosen.tolist()] + [[] for _ in range(31)], paths["pth"])
    pq.write_table(pa.table({"SAMPLE_ID": chosen}), paths["ids"])
    print(f"generated {rows:,} rows in {time.perf_counter() - started:.0f} s: {paths['data']}")
    return paths


# ---------------------------------------------------------------------------------------------
# The three ways (each runs in a child process: `--method NAME`)


def run_laionface(paths: dict[str, str], out: str, workers: int, defaults: bool) -> dict:
    from laionface.config import parse_config
    from laionface.engine.cluster import open_client
    from laionface.engine.pipeline import run_pipeline, worker_preload

    metadata = {
        "input": [paths["data"]],
        # The same list as DuckDB reads; the defaults row reads LAION-Face's .pth instead.
        "id_list": paths["pth"] if defaults else paths["ids"],
        "nsfw": NSFW,
        "min_similarity": MIN_SIMILARITY,
        "min_side": MIN_SIDE,
    }
    if not defaults:
        metadata.update(url_schemes=[], dedup_urls=False)
    config = parse_config(
        {
            "metadata": metadata,
            "cluster": {"workers": workers, "threads_per_worker": 1, "dashboard_address": ""},
        }
    )
    # The LocalCluster `laionface run --stages metadata` would start (its workers preload the
    # metadata stage's imports), started first so the stage's own time shows.
    with open_client(config, out, preload=worker_preload(["metadata"])) as client:
        workers_cpu = sum(client.run(time.process_time).values())
        started, cpu = time.perf_counter(), time.process_time()
        run_pipeline(
            config,
            run_dir=out,
            stages="metadata",
            scheduler=client.scheduler.address,
            progress=False,
        )
        work = time.perf_counter() - started
        driver_cpu = time.process_time() - cpu
        workers_cpu = sum(client.run(time.process_time).values()) - workers_cpu
    shards = sorted(Path(out, "metadata", "shards").glob("*.parquet"))
    ids = pa.concat_tables(pq.read_table(s, columns=["SAMPLE_ID"]) for s in shards)
    return {
        "work_s": work,
        "work_cpu_s": driver_cpu + workers_cpu,
        "driver_cpu_s": driver_cpu,
        "ids": ids.column(0),
    }


def run_duckdb(paths: dict[str, str], out: str, workers: int) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {workers}")
    target = str(Path(out, "selected.parquet"))
    Path(out).mkdir(parents=True, exist_ok=True)
    started, cpu = time.perf_counter(), time.process_time()
    con.execute(
        f"""
        COPY (
            SELECT * FROM read_parquet('{paths["data"]}')
            WHERE SAMPLE_ID IN (SELECT SAMPLE_ID FROM read_parquet('{paths["ids"]}'))
              AND NSFW IN ({", ".join(f"'{v}'" for v in NSFW)})
              AND similarity >= {MIN_SIMILARITY}
              AND least(WIDTH, HEIGHT) >= {MIN_SIDE}
        ) TO '{target}' (FORMAT parquet)
        """
    )
    work, cpu = time.perf_counter() - started, time.process_time() - cpu
    ids = pq.read_table(target, columns=["SAMPLE_ID"]).column(0)
    return {"work_s": work, "work_cpu_s": cpu, "ids": ids}


def run_laion_face_script(paths: dict[str, str], out: str) -> dict:
    """FacePerceiver/LAION-Face convert_parquet.py, plus the same three filters in pandas."""
    import torch

    started, cpu = time.perf_counter(), time.process_time()
    all_samples = torch.load(paths["pth"], weights_only=True)
    samples = set(all_samples[0])
    table = pq.read_table(paths["data"]).to_pandas()
    keep = (
        table["SAMPLE_ID"].isin(samples)
        & table["NSFW"].isin(NSFW)
        & (table["similarity"] >= MIN_SIMILARITY)
        & (np.minimum(table["WIDTH"], table["HEIGHT"]) >= MIN_SIDE)
    )
    table = table[keep]
    Path(out).mkdir(parents=True, exist_ok=True)
    target = str(Path(out, "selected.parquet"))
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), target)
    work, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"work_s": work, "work_cpu_s": cpu, "ids": pa.array(table["SAMPLE_ID"].to_numpy())}


def child(method: str, paths: dict[str, str], out: str, workers: int) -> None:
    if method == "laionface":
        result = run_laionface(paths, out, workers, defaults=False)
    elif method == "laionface-defaults":
        result = run_laionface(paths, out, workers, defaults=True)
    elif method == "duckdb":
        result = run_duckdb(paths, out, workers)
    else:
        result = run_laion_face_script(paths, out)
    ids = np.sort(np.asarray(result.pop("ids")))
    result["rows"] = len(ids)
    result["ids_digest"] = hashlib.sha256(ids.astype(np.int64).tobytes()).hexdigest()
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Measuring


def _tree_rss(root: int) -> int:
    """Sum of RSS (bytes) of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def measure(method: str, paths: dict[str, Path], workers: int) -> dict:
    """Run one method in a child process: wall time, CPU time and peak RSS of its process tree."""
    out = tempfile.mkdtemp(prefix=f"bench-metadata-{method}-")
    command = [sys.executable, __file__, "--method", method, "--out", out]
    command += [
        "--workers",
        str(workers),
        "--paths",
        json.dumps({k: str(v) for k, v in paths.items()}),
    ]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        peak = 0
        while True:
            # wait4 gives the CPU time of the whole tree: Dask's nannies wait for their workers,
            # the driver for its nannies.
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _tree_rss(process.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    shutil.rmtree(out, ignore_errors=True)
    if process.returncode != 0:
        raise SystemExit(f"{method} failed:\n{errors[-3000:]}")
    result = json.loads(next(ln for ln in output.splitlines() if ln.startswith("RESULT "))[7:])
    return {**result, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--row-group", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2, help="laionface workers, DuckDB threads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "laionface-bench"))
    parser.add_argument(
        "--only-laionface",
        action="store_true",
        help="run only the laionface stage (e.g. its peak RSS on a 13M-row LAION part)",
    )
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        child(args.method, json.loads(args.paths), args.out, args.workers)
        return

    paths = generate(Path(args.cache), args.rows, args.row_group)
    methods = ["laionface", "duckdb", "laion-face-script", "laionface-defaults"]
    if args.only_laionface:
        methods = ["laionface", "laionface-defaults"]
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for method in methods:
            result = measure(method, paths, args.workers)
            print(
                f"round {round_ + 1} {method:>18}: process {result['wall_s']:6.2f} s, "
                f"work {result['work_s']:6.2f} s, {result['peak_rss'] / 2**20:6.0f} MiB, "
                f"{result['rows']:,} rows",
                flush=True,
            )
            if method not in best or result["work_s"] < best[method]["work_s"]:
                best[method] = result
    reference = best["laionface"]
    for method in methods[1:]:
        if (best[method]["rows"], best[method]["ids_digest"]) != (
            reference["rows"],
            reference["ids_digest"],
        ):
            raise SystemExit(f"{method} selected other rows than laionface: {best[method]}")
    if not args.only_laionface:
        report(args, best, methods)


def report(args: argparse.Namespace, best: dict[str, dict], methods: list[str]) -> None:
    labels = {
        "laionface": "laionface metadata stage",
        "laionface-defaults": "laionface, .pth list, schemes + dedup",
        "duckdb": "DuckDB SQL",
        "laion-face-script": "LAION-Face script (pandas + set)",
    }
    print(
        f"\n{args.rows:,} rows, row groups of {args.row_group:,}, {args.workers} workers/threads, "
        f"{best['laionface']['rows']:,} rows selected; best of {args.rounds} round(s)\n"
    )
    print(
        f"| {'method':<38} | work s | rows/s | work CPU s | process s | process CPU s "
        "| peak RSS MiB |"
    )
    print(f"|{'-' * 40}|-------:|-------:|-----------:|----------:|--------------:|-------------:|")
    for method in methods:
        r = best[method]
        print(
            f"| {labels[method]:<38} | {r['work_s']:6.2f} | {args.rows / r['work_s'] / 1e6:5.2f}M "
            f"| {r['work_cpu_s']:10.2f} | {r['wall_s']:9.2f} | {r['cpu_s']:13.1f} "
            f"| {r['peak_rss'] / 2**20:12.0f} |"
        )
    lf, duck, script = best["laionface"], best["duckdb"], best["laion-face-script"]
    print(
        "\nwork: the selection itself (laionface: `run_pipeline(stages=metadata)` on a running"
        " LocalCluster; DuckDB: the COPY; script: torch.load to the written parquet);"
        " process: the whole child process, interpreter, imports and cluster start included.\n"
        f"laionface / DuckDB time: work {lf['work_s'] / duck['work_s']:.2f}x "
        f"(work CPU {lf['work_cpu_s'] / duck['work_cpu_s']:.2f}x), "
        f"process {lf['wall_s'] / duck['wall_s']:.2f}x, CPU {lf['cpu_s'] / duck['cpu_s']:.2f}x "
        "(goal <= 1.3x)\n"
        f"LAION-Face script / laionface time: work {script['work_s'] / lf['work_s']:.2f}x "
        f"(work CPU {script['work_cpu_s'] / lf['work_cpu_s']:.2f}x), "
        f"process {script['wall_s'] / lf['wall_s']:.2f}x, "
        f"CPU {script['cpu_s'] / lf['cpu_s']:.2f}x (goal >= 5x)\n"
        f"laionface / LAION-Face script peak RSS: {lf['peak_rss'] / script['peak_rss']:.2f} "
        "(goal <= 0.33)"
    )


if __name__ == "__main__":
    main()
