"""The download stage, for real: img2dataset's downloader on Dask against servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
from distributed import Client, LocalCluster
from PIL import Image

from laionface.config import Config
from laionface.demo.corpus import DEMO_HOST, build_corpus
from laionface.demo.imageserver import PRIVATE_REDIRECT_TARGET
from laionface.engine.cluster import open_client
from laionface.engine.pipeline import run_stage, stage_of
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext
from laionface.io import storage
from laionface.io.schemas import DOWNLOAD_SHARD
from laionface.layout import DOWNLOAD_CATEGORIES
from laionface.stages.download.outcomes import latest_outcomes
from laionface.stages.download.shard import ShardDeadlineExceeded, download_shard
from tests.imageservers import CountingImageServer

SLOW_SECONDS = 3.0
REPO = Path(__file__).resolve().parents[1]

# What each demo case must end as, with min_image_size = 16 (so the tiny images are refused).
EXPECTED_CATEGORY = {
    "ok": None,
    "redirect": None,
    "too_small": "too_small",
    "http_404": "http_404",
    "http_5xx": "http_5xx",
    "timeout": "timeout",
    "not_an_image": "not_an_image",
    "truncated": "not_an_image",
    "opted_out": "opted_out",
    "flaky": "http_5xx",  # its first request fails; --retry-failed recovers it
    "redirect_private": "blocked_address",
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    # Same folder as the other modules' corpus fixtures: whichever runs first builds it.
    return build_corpus(tmp_path_factory.getbasetemp() / "demo-corpus-seed0", seed=0)


@pytest.fixture(scope="module")
def server(corpus):
    with CountingImageServer(corpus.root, slow_seconds=SLOW_SECONDS) as running:
        yield running


@pytest.fixture(scope="module")
def client():
    # Thread workers keep this module fast; test_process_workers proves the tasks pickle.
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def ok_files(corpus) -> list[str]:
    truth = corpus.read_truth().to_pylist()
    return sorted(r["file"] for r in truth if r["case"] == "ok" and r["format"] == "jpeg")


def _config(rows_per_shard: int = 100, **download_settings) -> Config:
    config = Config()
    config.cluster.retries = 0
    config.metadata.rows_per_shard = rows_per_shard
    config.download.thread_count = 8
    config.download.timeout = 1.5
    for key, value in download_settings.items():
        setattr(config.download, key, value)
    return config


def _rows(urls: list[str], first_id: int = 0) -> pa.Table:
    rows = [
        dict(
            SAMPLE_ID=first_id + i,
            URL=url,
            TEXT=f"caption {first_id + i}",
            HEIGHT=100,
            WIDTH=100,
            LICENSE="?",
            NSFW="UNLIKELY",
            similarity=0.3,
            source_file="test",
            source_row=i,
        )
        for i, url in enumerate(urls)
    ]
    return pa.Table.from_pylist(rows, schema=DOWNLOAD_SHARD)


def _start_run(url: str, config: Config, rows: pa.Table, client, options=None) -> StageContext:
    """A run folder holding `rows` as metadata shards, as the metadata stage writes them."""
    size = config.metadata.rows_per_shard
    for start in range(0, rows.num_rows, size):
        shard = storage.join(url, "metadata", "shards", f"{start // size:05d}.parquet")
        storage.write_parquet(rows.slice(start, size), shard)
    run = RunFolder(url)
    run.start(config)
    return StageContext(
        config, run, client, progress=False, options=dict(options or {}), stage=stage_of("download")
    )


def _raw(url: str) -> pa.Table:
    return pa.concat_tables(
        storage.read_parquet(p) for p in storage.list_files(storage.join(url, "raw"), ".parquet")
    )


def _tar_keys(path: str) -> Counter:
    fs, inner = storage.fs_for(path)
    with fs.open(inner, "rb") as handle, tarfile.open(fileobj=handle) as tar:
        return Counter(name.split(".", 1)[0] for name in tar.getnames())


def test_demo_corpus_every_case_gets_its_category(corpus, server, client, tmp_path):
    server.reset()
    config = _config(resolve=server.resolve_map, allow_loopback=True, min_image_size=16)
    metadata = corpus.read_metadata()
    rows = metadata.append_column("source_file", pa.array(["demo"] * metadata.num_rows))
    rows = rows.append_column("source_row", pa.array(range(metadata.num_rows), pa.int64()))
    ctx = _start_run(str(tmp_path / "run"), config, rows.cast(DOWNLOAD_SHARD), client)

    run_stage(ctx)

    raw = _raw(ctx.run.url)
    truth = {r["SAMPLE_ID"]: r for r in corpus.read_truth().to_pylist()}
    # Nothing lost, nothing twice: one raw row per metadata row.
    assert sorted(raw["SAMPLE_ID"].to_pylist()) == sorted(truth)
    wrong = []
    for row in raw.to_pylist():
        case = truth[row["SAMPLE_ID"]]["case"]
        if row["error_category"] != EXPECTED_CATEGORY[case]:
            wrong.append((case, row["url"], row["error_category"], row["error_message"]))
    assert not wrong, wrong
    assert set(raw["error_category"].to_pylist()) - {None} <= set(DOWNLOAD_CATEGORIES)
    # Successes are the served bytes, whole.
    for row in raw.to_pylist():
        if row["status"] == "success":
            assert row["sha256"] == truth[row["SAMPLE_ID"]]["sha256"], row["url"]
    # The private redirect was refused before any connection (else: timeout or connection).
    private = [r for r in raw.to_pylist() if truth[r["SAMPLE_ID"]]["case"] == "redirect_private"]
    assert private and all("169.254.169.254" in r["error_message"] for r in private)

    # img2dataset's layout per shard: the tar holds jpg, txt and json for each success only.
    for shard in ("00000", "00001", "00002", "00003"):
        table = storage.read_parquet(ctx.path("raw", f"{shard}.parquet"))
        assert all(k.startswith(f"{shard}0") and len(k) == 9 for k in table["key"].to_pylist())
        successes = {r["key"] for r in table.to_pylist() if r["status"] == "success"}
        assert _tar_keys(ctx.path("raw", f"{shard}.tar")) == Counter({k: 3 for k in successes})
        stats = storage.read_json(ctx.path("raw", f"{shard}_stats.json"))
        assert stats["count"] == table.num_rows and stats["successes"] == len(successes)

    outcomes = storage.read_json(ctx.path("run.json"))["stages"]["download"]["outcomes"]
    expected = Counter(EXPECTED_CATEGORY[r["case"]] for r in truth.values())
    assert outcomes["rows"] == len(truth)
    assert outcomes["successes"] == expected.pop(None)
    assert outcomes["by_category"] == dict(expected)


def test_opt_out_headers_are_honoured_and_can_be_switched_off(corpus, server, ok_files, tmp_path):
    urls = [f"http://{DEMO_HOST}/noai/{name}" for name in ok_files[:3]]
    settings = dict(resolve=server.resolve_map, allow_loopback=True)
    for directives, category in ((["noai"], "opted_out"), ([], None), (["noimageai"], None)):
        config = _config(**settings, disallowed_header_directives=directives)
        url = str(tmp_path / f"run-{len(directives)}-{category}")
        _start_run(url, config, _rows(urls), client=None)
        download_shard(
            in_url=storage.join(url, "metadata", "shards", "00000.parquet"),
            raw_url=storage.join(url, "raw"),
            shard_id=0,
            settings=config.download.model_dump(),
            samples_per_shard=10_000,
        )
        assert _raw(url)["error_category"].to_pylist() == [category] * 3, directives


def _download_rows(url: str, config: Config, urls: list[str]) -> list[dict]:
    """Run one shard directly (no cluster) and return its raw rows in input order."""
    _start_run(url, config, _rows(urls), client=None)
    stats = download_shard(
        in_url=storage.join(url, "metadata", "shards", "00000.parquet"),
        raw_url=storage.join(url, "raw"),
        shard_id=0,
        settings=config.download.model_dump(),
        samples_per_shard=10_000,
    )
    rows = _raw(url).to_pylist()
    assert stats["items"] == len(rows) == len(urls)
    return rows


def test_private_and_loopback_addresses_are_refused(server, ok_files, tmp_path):
    image = ok_files[0]
    port = server.port
    urls = [
        f"{server.base_url}/img/{image}",  # loopback by address
        f"http://localhost:{port}/img/{image}",  # loopback by name
        f"http://{DEMO_HOST}/img/{image}",  # mapped to loopback by download.resolve
        "http://10.1.2.3/image.jpg",
        "http://192.168.0.1/image.jpg",
        PRIVATE_REDIRECT_TARGET,
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://0.0.0.0/image.jpg",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",  # IPv4-mapped IPv6
        f"http://{DEMO_HOST}/redirect/private/x",  # a redirect to the metadata service
        # IPv6 addresses that carry traffic to a refused IPv4 address
        "http://[2002:a9fe:a9fe::1]/latest/meta-data/",  # 6to4 of 169.254.169.254
        "http://[2002:a00:1::1]/image.jpg",  # 6to4 of 10.0.0.1
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/image.jpg",  # Teredo (client 192.0.2.45)
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of 169.254.169.254
        # cloud metadata services, public addresses among them
        "http://168.63.129.16/machine?comp=goalstate",  # Azure's wire server
        "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud
    ]
    server.reset()
    strict = _config(resolve=server.resolve_map, allow_loopback=False)
    rows = _download_rows(str(tmp_path / "strict"), strict, urls)
    assert [r["error_category"] for r in rows] == ["blocked_address"] * len(urls)
    assert server.requests == {}  # refused before connecting, redirect included
    messages = {r["url"]: r["error_message"] for r in rows}
    assert "6to4 address of 169.254.169.254" in messages[urls[10]]
    assert "6to4 address of 10.0.0.1" in messages[urls[11]]
    assert "Teredo address of 192.0.2.45" in messages[urls[12]]
    assert "NAT64 address of 169.254.169.254" in messages[urls[13]]
    assert "cloud metadata service" in messages["http://168.63.129.16/machine?comp=goalstate"]
    # The checks apply while a shard downloads, not to the rest of the process afterwards.
    with urllib.request.urlopen(f"{server.base_url}/img/{image}", timeout=5) as response:
        assert response.status == 200

    # allow_loopback permits loopback and nothing else.
    demo = _config(resolve=server.resolve_map, allow_loopback=True)
    rows = _download_rows(str(tmp_path / "demo"), demo, urls)
    assert [r["error_category"] for r in rows] == [None] * 3 + ["blocked_address"] * 13
    assert server.request_count("/redirect/private/x") == 1


class _EdgeHandler(http.server.BaseHTTPRequestHandler):
    """Responses the demo server doesn't make: big, chunked, trickling, 403, a redirect loop."""

    protocol_version = "HTTP/1.1"
    images: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Transfer-Encoding" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        name = self.path.strip("/")
        try:
            if name in self.images:
                self._send(200, self.images[name], {"Content-Type": "image/jpeg"})
            elif name == "big-with-length":
                self._send(200, self.images["big.jpg"], {"Content-Type": "image/jpeg"})
            elif name == "big-chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                data = self.images["big.jpg"]
                for start in range(0, len(data), 8192):
                    chunk = data[start : start + 8192]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            elif name == "trickle":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(1000):  # a byte every 0.2 s: each read is well within timeout
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif name == "forbidden":
                self._send(403, b"forbidden")
            elif name == "empty":
                self._send(200, b"", {"Content-Type": "image/jpeg"})
            elif name == "loop":
                self._send(302, b"", {"Location": "/loop"})
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass


def _jpeg(width: int, height: int, noise: bool = False) -> bytes:
    buffer = io.BytesIO()
    if noise:
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (200, 120, 40))
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def edge_server():
    _EdgeHandler.images = {
        "fine.jpg": _jpeg(100, 80),
        "wide.jpg": _jpeg(400, 40),
        "area.jpg": _jpeg(300, 300),
        "big.jpg": _jpeg(500, 500, noise=True),  # about 290 kB
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EdgeHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_size_caps_deadlines_and_network_failures_are_classified(edge_server, tmp_path):
    assert len(_EdgeHandler.images["big.jpg"]) > 200_000
    cases = {
        f"{edge_server}/fine.jpg": None,
        f"{edge_server}/big-with-length": "too_large",  # refused on its Content-Length
        f"{edge_server}/big-chunked": "too_large",  # no length: cut off while reading
        f"{edge_server}/trickle": "timeout",  # abandoned at request_deadline
        f"{edge_server}/wide.jpg": "bad_aspect_ratio",
        f"{edge_server}/area.jpg": "too_large",  # max_image_area
        f"{edge_server}/forbidden": "http_4xx",
        f"{edge_server}/empty": "not_an_image",  # a 0-byte body
        f"{edge_server}/missing.jpg": "http_404",
        f"{edge_server}/loop": "other",  # redirect loop
        f"http://127.0.0.1:{_closed_port()}/x.jpg": "connection",
        "http://no-such-host.invalid/x.jpg": "dns",
        "file:///etc/passwd": "other",  # only http and https are fetched
    }
    config = _config(
        allow_loopback=True,
        max_bytes=200_000,
        timeout=2.0,
        # /trickle sends a byte every 0.2 s for 200 s: each read is within the timeout, only the
        # deadline stops it; 3 s leaves the small images room on a loaded machine.
        request_deadline=3.0,
        max_aspect_ratio=5.0,
        max_image_area=50_000,
        thread_count=12,
    )
    rows = _download_rows(str(tmp_path / "run"), config, list(cases))
    got = {r["url"]: r["error_category"] for r in rows}
    messages = {r["url"]: r["error_message"] for r in rows}
    assert got == cases, messages
    assert messages[f"{edge_server}/big-with-length"].startswith("too_large:")
    assert messages[f"{edge_server}/big-chunked"].startswith("too_large:")
    assert "request_deadline" in messages[f"{edge_server}/trickle"]
    assert "empty response body (0 bytes)" in messages[f"{edge_server}/empty"]


def test_shard_past_its_deadline_fails_and_leaves_nothing(server, ok_files, tmp_path):
    config = _config(
        resolve=server.resolve_map, allow_loopback=True, timeout=10.0, shard_deadline=1.0
    )
    urls = [f"http://{DEMO_HOST}/slow/{name}" for name in ok_files[:4]]
    url = str(tmp_path / "run")
    _start_run(url, config, _rows(urls), client=None)
    with pytest.raises(ShardDeadlineExceeded, match="00000 not finished after 1 s"):
        download_shard(
            in_url=storage.join(url, "metadata", "shards", "00000.parquet"),
            raw_url=storage.join(url, "raw"),
            shard_id=0,
            settings=config.download.model_dump(),
            samples_per_shard=10_000,
        )
    assert os.listdir(tmp_path / "run" / "raw") == []


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_killed_shard_is_never_visible_and_resumes(server, client, ok_files, tmp_path):
    config = _config(resolve=server.resolve_map, allow_loopback=True, timeout=10.0)
    # Quick images first, then one that takes SLOW_SECONDS: the kill lands mid-shard.
    urls = [f"http://{DEMO_HOST}/img/{name}" for name in ok_files[:30]]
    urls.append(f"http://{DEMO_HOST}/slow/{ok_files[30]}")
    url = str(tmp_path / "run")
    ctx = _start_run(url, config, _rows(urls), client)
    raw = tmp_path / "run" / "raw"
    kwargs = dict(
        in_url=storage.join(url, "metadata", "shards", "00000.parquet"),
        raw_url=str(raw),
        shard_id=0,
        settings=config.download.model_dump(),
        samples_per_shard=10_000,
    )
    code = (
        "import json, sys; from laionface.stages.download.shard import download_shard;"
        " download_shard(**json.loads(sys.argv[1]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def partial_tar() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the shard process ended early: {process.stderr.read().decode()[-2000:]}")
        tars = list(raw.glob(".tmp-00000/*/00000.tar")) if raw.exists() else []
        return bool(tars) and tars[0].stat().st_size > 0

    try:
        _wait_for(partial_tar, 60, "the shard to start writing its tar")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".tmp-")) == []
    assert not storage.exists(ctx.path("download", "_done", "00000.json"))

    run_stage(ctx)
    assert sorted(p.name for p in raw.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]
    assert _tar_keys(str(raw / "00000.tar")) == Counter({f"00000{i:04d}": 3 for i in range(31)})

    # A complete shard is skipped: no request reaches the server again.
    before = server.requests
    run_stage(ctx)
    assert server.requests == before


def test_retry_failed_recovers_transient_failures_and_counts_rows_once(
    server, client, ok_files, tmp_path, caplog
):
    server.reset()
    urls = [f"http://{DEMO_HOST}/img/{name}" for name in ok_files[:6]]
    urls += [f"http://{DEMO_HOST}/flaky/1/{name}" for name in ok_files[6:8]]  # 500, then fine
    urls += [f"http://{DEMO_HOST}/error/503/x", f"http://{DEMO_HOST}/img/missing.jpg"]
    config = _config(
        rows_per_shard=5,
        resolve=server.resolve_map,
        allow_loopback=True,
        failure_rate_warning=0.5,
    )
    url = str(tmp_path / "run")
    ctx = _start_run(url, config, _rows(urls), client)
    run_stage(ctx)
    first = latest_outcomes(url)
    assert first["error_category"].to_pylist() == [None] * 6 + ["http_5xx"] * 3 + ["http_404"]
    assert "download shard 00001: 80% of rows failed" in caplog.text

    ctx.options["retry_failed"] = True
    run_stage(ctx)
    second = latest_outcomes(url)
    # One row per input row, under its latest outcome: the flaky rows recovered in shard 00002.
    assert second["input_key"].to_pylist() == first["input_key"].to_pylist()
    assert second["error_category"].to_pylist() == [None] * 8 + ["http_5xx", "http_404"]
    assert second["attempts"].to_pylist() == [1] * 6 + [2, 2, 2, 1]
    assert second["shard"].to_pylist() == ["00000"] * 5 + ["00001"] + ["00002"] * 3 + ["00001"]
    retry_rows = storage.read_parquet(ctx.path("raw", "00002.parquet"))
    assert retry_rows["retry_of"].to_pylist() == ["000010001", "000010002", "000010003"]
    assert retry_rows["key"].to_pylist() == ["000020000", "000020001", "000020002"]
    assert _tar_keys(ctx.path("raw", "00002.tar")) == Counter({"000020000": 3, "000020001": 3})
    outcomes = storage.read_json(ctx.path("run.json"))["stages"]["download"]["outcomes"]
    assert outcomes == {
        "rows": 10,
        "successes": 8,
        "failed": 2,
        "by_category": {"http_404": 1, "http_5xx": 1},
        "retried_rows": 3,
        "recovered_by_retry": 2,
    }

    # Another round retries only what is still transient; a plain re-run fetches nothing.
    run_stage(ctx)
    third = latest_outcomes(url)
    assert third["attempts"].to_pylist() == [1] * 6 + [2, 2, 3, 1]
    assert third.num_rows == 10
    ctx.options["retry_failed"] = False
    before = server.requests
    run_stage(ctx)
    assert server.requests == before
    assert server.request_count(f"/flaky/1/{ok_files[6]}") == 2


def test_process_workers_and_a_remote_run_folder(server, client, ok_files, tmp_path):
    urls = [f"http://{DEMO_HOST}/img/{name}" for name in ok_files[:12]]
    config = _config(rows_per_shard=6, resolve=server.resolve_map, allow_loopback=True)
    config.cluster.workers = 1
    config.cluster.dashboard_address = ":0"

    # Local run folder: open_client starts process workers, so the tasks must pickle.
    url = str(tmp_path / "run")
    with open_client(config, url) as processes:
        ctx = _start_run(url, config, _rows(urls), processes)
        run_stage(ctx)
    assert latest_outcomes(url)["status"].to_pylist() == ["success"] * 12

    # memory:// stands for an object store: the shard is staged locally, then uploaded.
    remote = f"memory://download-test-{os.getpid()}"
    try:
        ctx = _start_run(remote, config, _rows(urls), client)
        run_stage(ctx)
        assert latest_outcomes(remote)["status"].to_pylist() == ["success"] * 12
        listed = fsspec.filesystem("memory").ls(remote + "/raw", detail=False)
        names = sorted(p.rsplit("/", 1)[1] for p in listed)
        assert names == [
            f"0000{s}{ext}" for s in "01" for ext in (".parquet", ".tar", "_stats.json")
        ]
        assert _tar_keys(storage.join(remote, "raw", "00001.tar")) == Counter(
            {f"00001{i:04d}": 3 for i in range(6)}
        )
    finally:
        fsspec.filesystem("memory").rm(remote.split("://")[1], recursive=True)


def test_bad_shard_input_is_named(tmp_path):
    url = str(tmp_path / "run")
    bad = _rows(["http://example.com/a.jpg"]).drop_columns(["TEXT"])
    storage.write_parquet(bad, storage.join(url, "metadata", "shards", "00000.parquet"))
    with pytest.raises(ValueError, match=r"00000\.parquet: missing column\(s\) TEXT"):
        download_shard(
            in_url=storage.join(url, "metadata", "shards", "00000.parquet"),
            raw_url=storage.join(url, "raw"),
            shard_id=0,
            settings=_config().download.model_dump(),
            samples_per_shard=10_000,
        )
    settings = _config(save_additional_columns=["SAMPLE_ID", "url"]).download.model_dump()
    with pytest.raises(ValueError, match="save_additional_columns.*url"):
        download_shard(
            in_url=storage.join(url, "metadata", "shards", "00000.parquet"),
            raw_url=storage.join(url, "raw"),
            shard_id=0,
            settings=settings,
            samples_per_shard=10_000,
        )
