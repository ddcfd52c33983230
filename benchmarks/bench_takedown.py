"""Memory and time of `laionface takedown` with a large ID list, against reading the IDs alone.

Writes (once, cached) a synthetic copy-mode dataset of `--shards` x `--per-shard` samples (a tiny
JPEG each, real tars, parquet files, manifest and dataset.json written with the contract's own
functions) and an ID list of `--ids` SAMPLE_IDs in each of `--formats` (.txt, .npy, .parquet;
the layouts metadata.exclude_list reads), `--hits` of them the IDs of dataset samples spread over
the shards, the rest IDs no sample has. Then, each in its own process and best of `--rounds`:

- baseline: the IDs as int64 from the .npy file (np.load): the floor, 8 bytes per ID;
- takedown: `takedown(DATASET, OUT, Selectors(ids=LIST))`, the whole command: the list read
  (idlists.read_list), every shard checked, the shards holding a hit rewritten, the rest copied.

Peak RSS is each child's (VmHWM; imports included; the baseline imports
laionface.dataset.takedown too, so the difference is the list and the work); "time" is the call, timed in the child after
its imports. The load average before each round is printed: on a shared machine, compare the
peak RSS, which load does not change.

    python benchmarks/bench_takedown.py [--ids 10000000] [--rounds 2]
    python benchmarks/bench_takedown.py --ids 200000 --shards 4 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FORMATS = ("txt", "npy", "parquet")


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def _sample_row(shard: int, index: int, sample_id: int, image: bytes) -> dict:
    import hashlib

    key = f"{shard:05d}{index:04d}"
    return {
        "key": key,
        "SAMPLE_ID": sample_id,
        "url": f"https://img.example.com/{key}.jpg",
        "caption": f"a face {key}",
        "width": 8,
        "height": 8,
        "LICENSE": "?",
        "NSFW": "UNLIKELY",
        "similarity": 0.35,
        "sha256": hashlib.sha256(image).hexdigest(),
        "phash": "0" * 16,
        "n_faces": 0,
        "faces": [],
        "raw_shard": f"{shard:05d}",
    }


def write_dataset(folder: Path, shards: int, per_shard: int) -> list[int]:
    """A copy-mode dataset of shards x per_shard samples; returns its SAMPLE_IDs in order."""
    from laionface.dataset import contract
    from laionface.io.tars import HashingWriter, TarWriter

    folder.mkdir(parents=True)
    image, files, samples, manifest, ids = _jpeg(), {}, {}, [], []
    for shard, name in enumerate(contract.shard_names(shards)):
        rows = [
            _sample_row(shard, i, 10**9 + shard * per_shard + i, image) for i in range(per_shard)
        ]
        ids += [r["SAMPLE_ID"] for r in rows]
        with open(folder / contract.tar_name(name), "wb") as handle:
            writer = HashingWriter(handle)
            tar = TarWriter(writer)
            for index, row in enumerate(rows):
                members = {
                    "jpg": tar.add(f"{row['key']}.jpg", image),
                    "json": tar.add(f"{row['key']}.json", contract.sample_json_bytes(row)),
                    "txt": tar.add(f"{row['key']}.txt", row["caption"].encode()),
                }
                tar_file = contract.tar_name(name)
                manifest.append(
                    contract.manifest_row(
                        row["key"], row["SAMPLE_ID"], name, index, tar_file, members
                    )
                )
            tar.close()
        files[contract.tar_name(name)] = {
            "sha256": writer.sha256.hexdigest(),
            "md5": writer.md5.hexdigest(),
            "size": writer.size,
        }
        files[contract.parquet_name(name)] = _write(
            folder, contract.parquet_name(name), pa.Table.from_pylist(rows, contract.DATASET_SHARD)
        )
        samples[name] = per_shard
    files[contract.MANIFEST_PARQUET] = _write(
        folder, contract.MANIFEST_PARQUET, pa.Table.from_pylist(manifest, contract.MANIFEST)
    )
    _finish(folder, files, samples, shards * per_shard)
    return ids


def _write(folder: Path, name: str, table: pa.Table) -> dict:
    from laionface.dataset import contract

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    (folder / name).write_bytes(buffer.getvalue())
    return contract.file_entry(buffer.getvalue())


def _finish(folder: Path, files: dict, samples: dict, total: int) -> None:
    """sizes.json, shardindex.json, the card and dataset.json."""
    from laionface.dataset import contract

    for name, obj in (
        (contract.SIZES_JSON, contract.sizes(samples)),
        (contract.SHARD_INDEX_JSON, contract.shard_index("bench", samples, files)),
    ):
        (folder / name).write_bytes(contract.json_bytes(obj))
        files[name] = contract.file_entry(contract.json_bytes(obj))
    meta = {
        "format": contract.FORMAT,
        "format_version": contract.FORMAT_VERSION,
        "name": "bench",
        "created": "2026-01-01T00:00:00+00:00",
        "mode": "copy",
        "order": contract.ORDER_RULE,
        "samples_per_shard": max(samples.values()),
        "max_shard_bytes": None,
        "counts": {"samples": total, "shards": len(samples)},
        "stages": {},
        "versions": {},
        "funnel": {"input_rows": total, "kept": total, "conservation": "ok", "stages": []},
    }
    card = contract.dataset_card(meta, "jpg").encode()
    (folder / contract.DATASET_CARD).write_bytes(card)
    files[contract.DATASET_CARD] = contract.file_entry(card)
    meta["files"] = dict(sorted(files.items()))
    (folder / contract.DATASET_JSON).write_bytes(contract.json_bytes(meta))


def write_lists(folder: Path, dataset_ids: list[int], n_ids: int, hits: int) -> None:
    """ids.{txt,npy,parquet}: `hits` dataset IDs spread over the shards, the rest absent IDs."""
    rng = np.random.default_rng(0)
    listed = rng.integers(2**40, 2**50, n_ids, dtype=np.int64)
    listed[:hits] = np.array(dataset_ids)[np.linspace(0, len(dataset_ids) - 1, hits, dtype=int)]
    np.save(folder / "ids.npy", listed)
    pq.write_table(pa.table({"SAMPLE_ID": listed}), folder / "ids.parquet")
    with open(folder / "ids.txt", "w") as handle:
        for start in range(0, n_ids, 1_000_000):
            handle.write("\n".join(map(str, listed[start : start + 1_000_000].tolist())) + "\n")


def cached(cache: Path, args) -> Path:
    folder = cache / f"takedown-{args.shards}x{args.per_shard}-{args.ids}-{args.hits}"
    if not (folder / "ids.txt").exists():
        shutil.rmtree(folder, ignore_errors=True)
        ids = write_dataset(folder / "dataset", args.shards, args.per_shard)
        write_lists(folder, ids, args.ids, args.hits)
    return folder


def child(method: str, folder: str, fmt: str) -> None:
    from laionface.dataset.takedown import Selectors, takedown

    start = time.perf_counter()
    if method == "baseline":
        ids = np.load(os.path.join(folder, "ids.npy"))
        detail = {"ids": int(len(ids))}
    else:
        out = tempfile.mkdtemp(prefix="bench-takedown-")
        try:
            selectors = Selectors(ids=os.path.join(folder, f"ids.{fmt}"))
            result = takedown(os.path.join(folder, "dataset"), out, selectors, workers=2)
            detail = {"removed": result.removed, "rewritten": len(result.rewritten)}
        finally:
            shutil.rmtree(out, ignore_errors=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss(), **detail}))


def peak_rss() -> int:
    """This process's peak RSS in bytes. Linux's VmHWM belongs to the address space, so it
    starts afresh at exec; ru_maxrss would carry the parent's peak at fork into the child."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(method: str, folder: Path, fmt: str, rounds: int) -> dict:
    best = None
    for _ in range(rounds):
        print(f"  load average {os.getloadavg()[0]:.1f}: {method} {fmt}", file=sys.stderr)
        command = [sys.executable, __file__, "--child", method, str(folder), fmt]
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        if best is None or result["peak_rss"] < best["peak_rss"]:
            best = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", type=int, default=10_000_000)
    parser.add_argument("--hits", type=int, default=100)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "laionface-bench"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    folder = cached(Path(args.cache), args)
    base = measure("baseline", folder, "npy", args.rounds)
    mb = 1024 * 1024
    print(f"{args.ids:,} IDs, {args.shards} shards x {args.per_shard} samples, {args.hits} hits")
    print(f"{'method':<18}{'time s':>9}{'peak RSS MB':>14}{'x baseline':>12}{'MB / M IDs':>12}")
    print(f"{'baseline (npy)':<18}{base['seconds']:>9.2f}{base['peak_rss'] / mb:>14.0f}{1:>12.2f}")
    for fmt in args.formats.split(","):
        got = measure("takedown", folder, fmt, args.rounds)
        extra = (got["peak_rss"] - base["peak_rss"]) / mb / (args.ids / 1e6)
        ratio = got["peak_rss"] / base["peak_rss"]
        line = f"{'takedown ' + fmt:<18}{got['seconds']:>9.2f}{got['peak_rss'] / mb:>14.0f}"
        print(f"{line}{ratio:>12.2f}{extra:>12.1f}   {got['removed']}")


if __name__ == "__main__":
    main()
