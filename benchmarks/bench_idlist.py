"""LAION-Face's ID list (laion_face_ids.pth) read by `idlists.read_list`, against the read before.

Writes (once, cached) a synthetic list of LAION-Face's shape: `--ids` int SAMPLE_IDs in `--parts`
Python lists, as torch.save writes them (a zip holding `archive/data.pkl`, pickle protocol 2),
streamed part by part: the writer holds one part's ints at a time (and, once, the IDs as int64 to
take the expected digest). The IDs are uniform in [2^47, 2^55): 9 pickle bytes each, which puts
49M IDs at the real file's 443 MB; `--widths mixed` draws IDs of every width (1-8 bytes) instead.
Then runs, each in its own process and best of `--rounds`:

- read_list: `idlists.read_list`, the whole read (the sort and dedup of the IDs included);
- parse: `idlists._read_torch`, its part before the sort (the IDs as they are in the file);
- torch.load: the read before issue 14: torch.load(weights_only=True) (torch's pure-Python
  unpickler), the parts converted to int64 as idlists does, sorted and deduplicated
  (`--skip-torch` leaves it out: about a minute and 4 GB at 50M IDs);
- C unpickler: the alternative measured for the new read: Python's C Unpickler refusing every
  global and persistent id (nothing but builtins can be built), a type check, np.fromiter, the
  same sort.

Every method must give the same IDs (sha256 of the sorted unique IDs, against the writer's).
"time" is the read itself, timed inside the child after its imports; "CPU" its CPU time; peak RSS
is the child's (imports included). The load average before each round is printed: on a shared
machine, compare the CPU times.

    python benchmarks/bench_idlist.py [--ids 50000000] [--parts 32] [--rounds 3]
    python benchmarks/bench_idlist.py --ids 200000 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

METHODS = ("read_list", "parse", "torch.load", "C unpickler")
GOAL_S = 5.0  # issue 14: 50M IDs in 32 lists read in <= 5 s on the 2-core machine


# ---------------------------------------------------------------------------------------------
# The list


def _part_ids(seed: int, part: int, n: int, widths: str) -> np.ndarray:
    rng = np.random.default_rng([seed, part])
    if widths == "mixed":  # every pickle width, both signs
        bits = rng.integers(1, 64, n)
        return rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True) >> (64 - bits)
    return rng.integers(2**47, 2**55, n, dtype=np.int64)


def _pickled_list(index: int, values: list[int]) -> bytes:
    """The bytes pickle.dumps(outer, protocol=2) writes for `values`, item `index` of `outer`."""
    body = pickle.dumps(values, protocol=2)
    assert body[:5] == b"\x80\x02]q\x00" and body[-1:] == b"."
    memo = index + 1  # the outer list is memo 0
    put = b"q" + bytes([memo]) if memo < 256 else b"r" + memo.to_bytes(4, "little")
    return b"]" + put + body[5:-1]


def _stream_pickle(parts: list[list[int]]):
    """pickle.dumps(parts, protocol=2), one part at a time (a list of 2 to 1000 lists)."""
    assert 2 <= len(parts) <= 1000
    yield b"\x80\x02]q\x00("
    for index, values in enumerate(parts):
        yield _pickled_list(index, values)
    yield b"e."


def write_list(path: Path, n_ids: int, n_parts: int, widths: str, seed: int = 0) -> dict:
    """The .pth (zip, as torch.save lays it out) and the digest of its sorted unique IDs."""
    sample = [[1, 2**40, -5], [], [7], list(range(1500))]
    assert b"".join(_stream_pickle(sample)) == pickle.dumps(sample, protocol=2)
    sizes = np.full(n_parts, n_ids // n_parts)
    sizes[: n_ids % n_parts] += 1
    every = np.empty(n_ids, np.int64)
    temp = path.with_suffix(".tmp")

    def chunks():
        yield b"\x80\x02]q\x00("
        filled = 0
        for part, size in enumerate(sizes.tolist()):
            ids = _part_ids(seed, part, size, widths)
            every[filled : filled + size] = ids
            filled += size
            yield _pickled_list(part, ids.tolist())
        yield b"e."

    with zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as data_pkl:
            for chunk in chunks():
                data_pkl.write(chunk)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    os.replace(temp, path)
    return {"ids": n_ids, "unique_ids_sha256": _digest(every)}


def _digest(ids: np.ndarray) -> str:
    """The count and sha256 of the sorted unique IDs (not np.unique: its hash path is slow)."""
    if not np.all(ids[1:] > ids[:-1]):
        ids = np.sort(ids)
        ids = ids[np.concatenate(([True], ids[1:] != ids[:-1]))]
    return f"{len(ids)}:{hashlib.sha256(ids.astype('<i8').tobytes()).hexdigest()}"


def cached_list(cache: Path, n_ids: int, n_parts: int, widths: str) -> tuple[Path, dict]:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"laion_face_ids-{n_ids}-{n_parts}-{widths}.pth"
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        started = time.perf_counter()
        sidecar.write_text(json.dumps(write_list(path, n_ids, n_parts, widths)))
        print(f"wrote {path} in {time.perf_counter() - started:.1f} s", flush=True)
    return path, json.loads(sidecar.read_text())


# ---------------------------------------------------------------------------------------------
# The reads (in a child process each)


class _BuiltinsOnly(pickle.Unpickler):
    """The C unpickler with no global and no persistent id: it can build builtins only."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def _read_c_unpickler(path: str) -> np.ndarray:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    # BufferedReader: with peek() the C unpickler reads in 128 KB prefetches, not per opcode.
    parts = _BuiltinsOnly(io.BufferedReader(io.BytesIO(data), 1 << 20)).load()
    del data
    if not isinstance(parts, list) or not all(isinstance(part, list) for part in parts):
        raise SystemExit("not a list of lists")
    arrays = []
    for part in parts:
        if set(map(type, part)) - {int}:
            raise SystemExit("not ints")
        arrays.append(np.fromiter(part, np.int64, count=len(part)))
    from laionface.stages.metadata import idlists

    return idlists._sorted_unique(np.concatenate(arrays))  # the sort read_list uses


def _read_torch_load(path: str) -> np.ndarray:
    import torch

    from laionface.stages.metadata import idlists

    obj = torch.load(path, weights_only=True, map_location="cpu")
    ids, _ = idlists._from_torch_object(obj, path)
    return idlists._sorted_unique(np.concatenate(ids))


def child(method: str, path: str) -> None:
    from laionface.stages.metadata import idlists

    if method == "torch.load":
        import torch  # noqa: F401 - imported before the clock starts, like the others' modules
    started, cpu = time.perf_counter(), time.process_time()
    if method == "read_list":
        ids = idlists.read_list(path).ids
    elif method == "parse":
        ids = np.concatenate(idlists._read_torch(path)[0])
    elif method == "torch.load":
        ids = _read_torch_load(path)
    else:
        ids = _read_c_unpickler(path)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    result = {
        "s": seconds,
        "cpu_s": cpu,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "unique_ids_sha256": _digest(ids),
    }
    print("RESULT " + json.dumps(result))


def measure(method: str, path: Path) -> dict:
    command = [sys.executable, __file__, "--method", method, "--file", str(path)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{method} failed:\n{run.stderr[-3000:]}")
    return json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))[7:])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=50_000_000)
    parser.add_argument("--parts", type=int, default=32)
    parser.add_argument("--widths", choices=("laion", "mixed"), default="laion")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true", help="leave out torch.load (slow)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "laionface-bench"))
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        child(args.method, args.file)
        return

    path, expected = cached_list(Path(args.cache), args.ids, args.parts, args.widths)
    Path(path).read_bytes()  # the page cache holds the file for every method alike
    methods = [m for m in METHODS if not (args.skip_torch and m == "torch.load")]
    best: dict[str, dict] = {}
    loads: list[float] = []
    for round_ in range(args.rounds):
        for method in methods:
            if method == "torch.load" and method in best:
                continue  # one round is enough to compare; each takes ~1 min at 50M
            loads.append(os.getloadavg()[0])
            result = measure(method, path)
            if result["unique_ids_sha256"] != expected["unique_ids_sha256"]:
                raise SystemExit(f"{method} read other IDs than written: {result}")
            print(
                f"round {round_ + 1} {method:>12}: {result['s']:7.2f} s, CPU {result['cpu_s']:7.2f}"
                f" s, peak RSS {result['peak_rss'] / 2**20:6.0f} MiB (load {loads[-1]:.1f})",
                flush=True,
            )
            if method not in best or result["s"] < best[method]["s"]:
                best[method] = result
    report(args, path, best, methods, loads)


def report(args, path: Path, best: dict, methods: list[str], loads: list[float]) -> None:
    size = path.stat().st_size
    print(
        f"\n{args.ids:,} IDs in {args.parts} lists ({args.widths} widths), {size / 1e6:.0f} MB; "
        f"best of {args.rounds} round(s); load average {min(loads):.1f}-{max(loads):.1f} "
        f"on {os.cpu_count()} CPUs\n"
    )
    print("| method | time s | CPU s | peak RSS MiB | vs torch.load |")
    print("|---|---:|---:|---:|---:|")
    base = best.get("torch.load")
    for method in methods:
        r = best[method]
        ratio = f"{base['s'] / r['s']:.1f}x" if base else "-"
        print(
            f"| {method} | {r['s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss'] / 2**20:.0f} | {ratio} |"
        )
    if args.ids >= 50_000_000:
        verdict = "meets" if best["read_list"]["s"] <= GOAL_S else "misses"
        print(f"\nread_list {best['read_list']['s']:.2f} s {verdict} the goal: <= {GOAL_S:.0f} s")


if __name__ == "__main__":
    main()
