"""Download stage vs plain img2dataset, side by side, on the loopback image server.

Serves N demo-like JPEGs (real face photos cropped and scaled to 240-640 px, re-encoded) from
laionface's ImageServer in a process of its own, shows the server's own rate (so it is not the
bottleneck), then downloads the same N URLs with the same options, processes and threads:

- img2dataset: `img2dataset.download(...)` (its multiprocessing distributor), one parquet input;
- laionface: the download stage as `laionface run --stages download` runs it (a LocalCluster with
  as many worker processes, img2dataset's Downloader per shard), the same rows as metadata shards.

Each is run `--rounds` times, alternating; the best round of each is compared, two ways: the whole
call (process start-up and shutdown included), and from the first shard's start to the last shard's
end as img2dataset's own `NNNNN_stats.json` files record them in both outputs (the work itself,
shards and the layer that hands them out, without the fixed cost of starting processes, which on a
loaded 2-core machine is most of a 2,000-image run).

Like for like: laionface's per-host cap (`download.max_per_host`) is set to the thread count,
since every image comes from one host and img2dataset has no such cap; and the environment
Dask's nanny leaves in this process (`MALLOC_TRIM_THRESHOLD_`, which slows glibc's malloc, see
stages/download/heap.py) is undone before img2dataset spawns its processes.

`--shard-cpu` measures instead the CPU time per image of one shard of `--rows-per-shard` rows in
this process, img2dataset's `Downloader` against laionface's `download_shard` (address guard,
pixel cap, politeness, sorted categorised parquet, atomic moves), alternating `--rounds` times:
the per-request and per-shard cost laionface adds, without processes or Dask.

    python benchmarks/bench_download.py [--images 2000] [--processes 2] [--threads 32]
    python benchmarks/bench_download.py --shard-cpu [--rows-per-shard 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from laionface.config import Config
from laionface.demo.imageserver import ImageServer
from laionface.engine.cluster import open_client
from laionface.engine.pipeline import run_stage, stage_of, worker_preload
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext
from laionface.io import storage
from laionface.io.schemas import DOWNLOAD_SHARD

FACES = Path(__file__).resolve().parents[2] / "shared" / "faces"
EXTRA_COLUMNS = ["SAMPLE_ID", "NSFW", "similarity", "LICENSE"]


def fetch_rate(urls: list[str], threads: int = 16) -> dict[str, float]:
    """Fetch every URL with `threads` urllib clients, one connection per request (like
    img2dataset's urllib downloads); requests/s and MB/s."""

    def fetch(url: str) -> int:
        with urllib.request.urlopen(url, timeout=30) as response:
            return len(response.read())

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total_bytes = sum(pool.map(fetch, urls))
    seconds = time.perf_counter() - start
    return {
        "requests": float(len(urls)),
        "seconds": seconds,
        "requests_per_s": len(urls) / seconds,
        "mb_per_s": total_bytes / seconds / 1e6,
    }


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """N JPEGs cut from the shared face photos at random places and scales."""
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(FACES.glob("*.jpg"))]
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(240, 641))
        crop = src.crop((x, y, x + cw, y + ch))
        crop.thumbnail((side, side))
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=int(rng.integers(75, 95)))
        name = f"{i:06d}.jpg"
        (folder / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


def rows_for(base_url: str, names: list[str]) -> pa.Table:
    rows = [
        dict(
            SAMPLE_ID=i,
            URL=f"{base_url}/img/{name}",
            TEXT=f"a photo, number {i}",
            HEIGHT=0,
            WIDTH=0,
            LICENSE="?",
            NSFW="UNLIKELY",
            similarity=0.31,
            source_file="bench",
            source_row=i,
        )
        for i, name in enumerate(names)
    ]
    return pa.Table.from_pylist(rows, schema=DOWNLOAD_SHARD)


def _serve(corpus_dir: str, ready: Any, stop: Any) -> None:
    with ImageServer(corpus_dir) as server:
        ready.put(server.base_url)
        stop.wait()


@contextlib.contextmanager
def server_process(corpus_dir: Path) -> Iterator[str]:
    """The image server in a process of its own, so it shares no GIL with either downloader's
    driver (laionface's holds the Dask scheduler); yields its base URL."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve, args=(str(corpus_dir), ready, stop), daemon=True)
    process.start()
    try:
        yield ready.get(timeout=120)
    finally:
        stop.set()
        process.join(10)


def run_img2dataset(table: pa.Table, out: Path, args: argparse.Namespace) -> tuple[float, list]:
    """Seconds of the whole `img2dataset.download` call, and its shards' stats files."""
    from img2dataset import download

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    url_list = out / "input.parquet"
    storage.write_parquet(table, str(url_list))
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines, not ours
        download(
            url_list=str(url_list),
            input_format="parquet",
            url_col="URL",
            caption_col="TEXT",
            output_format="webdataset",
            output_folder=str(out / "shards"),
            processes_count=args.processes,
            thread_count=args.threads,
            number_sample_per_shard=args.rows_per_shard,
            save_additional_columns=list(EXTRA_COLUMNS),
            resize_mode="no",
            timeout=10,
            retries=0,
            user_agent_token="laionface",
            extract_exif=True,
            compute_hash="sha256",
        )
    seconds = time.perf_counter() - started
    stats = [json.loads(p.read_text()) for p in (out / "shards").glob("*_stats.json")]
    ok = sum(s["successes"] for s in stats)
    if ok != table.num_rows:
        sys.exit(f"img2dataset downloaded {ok} of {table.num_rows} images: the comparison is void")
    return seconds, stats


def run_laionface(table: pa.Table, out: Path, args: argparse.Namespace) -> tuple[float, list]:
    """Seconds of the whole stage (cluster start and stop included), and its shards' stats files."""
    shutil.rmtree(out, ignore_errors=True)
    for start in range(0, table.num_rows, args.rows_per_shard):
        shard = start // args.rows_per_shard
        storage.write_parquet(
            table.slice(start, args.rows_per_shard),
            str(out / "metadata" / "shards" / f"{shard:05d}.parquet"),
        )
    config = Config()
    config.cluster.workers = args.processes
    config.cluster.threads_per_worker = 1
    config.cluster.dashboard_address = ":0"
    config.metadata.rows_per_shard = args.rows_per_shard
    config.download.resize_mode = "no"
    config.download.timeout = 10
    config.download.retries = 0
    config.download.thread_count = args.threads
    config.download.user_agent_token = "laionface"
    config.download.save_additional_columns = list(EXTRA_COLUMNS)
    config.download.allow_loopback = True  # the benchmark server is on 127.0.0.1
    config.download.max_per_host = args.threads  # one host serves all: no cap, as img2dataset
    environ = dict(os.environ)
    started = time.perf_counter()
    # What `laionface run --stages download` does, minus the audit of the other stages' outputs.
    run = RunFolder(str(out))
    run.start(config)
    with open_client(config, run.url, preload=worker_preload(["download"])) as client:
        run_stage(StageContext(config, run, client, progress=False, stage=stage_of("download")))
    seconds = time.perf_counter() - started
    # Dask's nanny set variables for its workers in this process; img2dataset's next round would
    # inherit them.
    os.environ.clear()
    os.environ.update(environ)
    outcomes = run.state["stages"]["download"]["outcomes"]
    if outcomes["successes"] != table.num_rows:
        sys.exit(f"laionface downloaded {outcomes['successes']} of {table.num_rows} images")
    return seconds, [json.loads(p.read_text()) for p in (out / "raw").glob("*_stats.json")]


def _img2dataset_shard(table: pa.Table, out: Path, threads: int) -> None:
    """One shard through img2dataset's Downloader, as its download() builds it for these options."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    columns = [*EXTRA_COLUMNS, "caption", "url"]
    arrow = table.select([*EXTRA_COLUMNS, "TEXT", "URL"]).rename_columns(columns)
    feather = str(out / "00000.feather")
    with pa.OSFile(feather, "wb") as sink, pa.ipc.new_file(sink, arrow.schema) as writer:
        writer.write_table(arrow)
    resizer = Resizer(image_size=256, resize_mode="no", resize_only_if_bigger=False)
    Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=threads,
        save_caption=True,
        extract_exif=True,
        output_folder=str(out),
        column_list=columns,
        timeout=10,
        number_sample_per_shard=10_000,
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token="laionface",
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    ).download_shard((0, feather))


def _laionface_shard(table: pa.Table, out: Path, threads: int) -> None:
    """The same shard through the download stage's shard function (no Dask)."""
    from laionface.stages.download.shard import download_shard

    shutil.rmtree(out, ignore_errors=True)
    in_url = str(out / "metadata" / "shards" / "00000.parquet")
    storage.write_parquet(table, in_url)
    config = Config()
    config.download.timeout = 10
    config.download.thread_count = threads
    config.download.max_per_host = threads
    config.download.allow_loopback = True
    settings = config.download.model_dump()
    download_shard(
        in_url=in_url,
        raw_url=str(out / "raw"),
        shard_id=0,
        settings=settings,
        samples_per_shard=10_000,
    )


def shard_cpu(table: pa.Table, work: Path, args: argparse.Namespace) -> None:
    """CPU microseconds per image of one shard in this process, both sides, alternating."""
    sides = {"img2dataset": _img2dataset_shard, "laionface": _laionface_shard}
    for name, side in sides.items():  # warm up: imports, first connections
        side(table.slice(0, 20), work / name, args.threads)
    per_image: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name, side in sides.items():
            started = time.process_time()
            side(table, work / name, args.threads)
            per_image[name].append((time.process_time() - started) / table.num_rows * 1e6)
        print(
            f"round {round_ + 1}: CPU per image: img2dataset {per_image['img2dataset'][-1]:.0f} us,"
            f" laionface {per_image['laionface'][-1]:.0f} us"
        )
    best = {name: min(values) for name, values in per_image.items()}
    print(
        f"\nbest of {args.rounds}: img2dataset {best['img2dataset']:.0f} us/image, laionface "
        f"{best['laionface']:.0f} us/image; laionface adds {best['laionface'] - best['img2dataset']:+.0f} us"
        f" ({best['laionface'] / best['img2dataset']:.3f}x)"
    )


def side_by_side(base_url: str, names: list[str], work: Path, args: argparse.Namespace) -> None:
    """Both downloaders on the same images, `--rounds` times alternating; the table of the best."""
    rate = fetch_rate([f"{base_url}/img/{name}" for name in names], args.threads)
    print(
        f"image server alone (its own process; {args.threads} urllib client threads): "
        f"{rate['requests_per_s']:,.0f} images/s, {rate['mb_per_s']:.0f} MB/s"
    )
    table = rows_for(base_url, names)
    times: dict[str, list[float]] = {"img2dataset": [], "laionface": []}
    spans: dict[str, list[float]] = {"img2dataset": [], "laionface": []}
    runners = {"img2dataset": run_img2dataset, "laionface": run_laionface}
    for round_ in range(args.rounds):
        for name, runner in runners.items():
            seconds, stats = runner(table, work / name, args)
            times[name].append(seconds)
            # From the first shard's start to the last one's end, as img2dataset's own stats
            # files record them in both outputs: the work without process start and stop.
            spans[name].append(
                max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
            )
        print(
            f"round {round_ + 1}: whole command: img2dataset {times['img2dataset'][-1]:.2f} s,"
            f" laionface {times['laionface'][-1]:.2f} s; first shard start to last shard end:"
            f" img2dataset {spans['img2dataset'][-1]:.2f} s,"
            f" laionface {spans['laionface'][-1]:.2f} s"
        )
    n = args.images
    best = {name: min(values) for name, values in times.items()}
    span = {name: min(values) for name, values in spans.items()}
    print()
    print(
        f"| {'what':<32} | {'command s':>9} | {'images/s':>8} | {'shards s':>8} | {'images/s':>8} |"
    )
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    print(
        f"| {'image server alone':<32} | {rate['seconds']:>9.2f} | "
        f"{rate['requests_per_s']:>8.0f} | {'':>8} | {'':>8} |"
    )
    for name, label in (
        ("img2dataset", "img2dataset (multiprocessing)"),
        ("laionface", "laionface download stage (Dask)"),
    ):
        print(
            f"| {label:<32} | {best[name]:>9.2f} | {n / best[name]:>8.1f} | "
            f"{span[name]:>8.2f} | {n / span[name]:>8.1f} |"
        )
    print(
        f"\nlaionface / img2dataset rate, whole commands: "
        f"{best['img2dataset'] / best['laionface']:.2f}; first shard start to last shard end: "
        f"{span['img2dataset'] / span['laionface']:.2f} (goal >= 0.95; best of {args.rounds})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--rows-per-shard", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-cpu", action="store_true", help="one shard's CPU, in-process")
    parser.add_argument("--workdir", default="", help="default: a temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-download-"))
    images = args.rows_per_shard if args.shard_cpu else args.images
    names = make_images(work / "corpus" / "images", images)
    total_mb = sum((work / "corpus" / "images" / n).stat().st_size for n in names) / 1e6
    print(f"{images} JPEGs, {total_mb:.1f} MB; {args.processes} processes x {args.threads} threads")
    with server_process(work / "corpus") as base_url:
        if args.shard_cpu:
            shard_cpu(rows_for(base_url, names), work, args)
        else:
            side_by_side(base_url, names, work, args)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
