"""Politeness to each host, for real: the download stage against the image server's rate-limited
routes on 127.0.0.1 (at most max_per_host requests at once; 429 and 503 retried after the delay
they ask for, else rate_limited)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from distributed import Client, LocalCluster

from laionface.audit.funnel import funnel
from laionface.audit.report import write_report
from laionface.config import Config
from laionface.demo.corpus import DEMO_HOST, build_corpus
from laionface.demo.imageserver import BUSY_DATE_SECONDS, RateLimit
from laionface.engine.pipeline import run_stage, stage_of
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext
from laionface.io import storage
from laionface.io.schemas import DOWNLOAD_SHARD
from laionface.layout import TRANSIENT_CATEGORIES
from laionface.stages.download.outcomes import latest_outcomes
from laionface.stages.download.shard import download_shard
from tests.imageservers import CountingImageServer

# What /limited/ tolerates in these tests; the downloader's cap is set to its in-flight limit.
RULE = RateLimit(in_flight=3, per_second=5, retry_after=1, hold_seconds=0.05)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.getbasetemp() / "demo-corpus-seed0", seed=0)


@pytest.fixture(scope="module")
def server(corpus):
    with CountingImageServer(corpus.root, rate_limit=RULE) as running:
        yield running


@pytest.fixture(scope="module")
def images(corpus) -> list[str]:
    truth = corpus.read_truth().to_pylist()
    return sorted(r["file"] for r in truth if r["case"] == "ok" and r["format"] == "jpeg")


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as running,
    ):
        yield running


def _config(server, **download_settings) -> Config:
    config = Config()
    config.cluster.retries = 0
    config.metadata.rows_per_shard = 100
    config.download.resolve = server.resolve_map
    config.download.allow_loopback = True
    config.download.timeout = 5.0
    config.download.thread_count = 12
    for key, value in download_settings.items():
        setattr(config.download, key, value)
    return config


def _rows(urls: list[str]) -> pa.Table:
    rows = [
        dict(
            SAMPLE_ID=i,
            URL=url,
            TEXT=f"caption {i}",
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


def _context(url: str, config: Config, urls: list[str], client) -> StageContext:
    storage.write_parquet(_rows(urls), storage.join(url, "metadata", "shards", "00000.parquet"))
    run = RunFolder(url)
    run.start(config)
    return StageContext(config, run, client, progress=False, stage=stage_of("download"))


def _shard_rows(url: str, config: Config, urls: list[str]) -> list[dict]:
    """One shard downloaded in this process; its raw rows in input order."""
    _context(url, config, urls, client=None)
    download_shard(
        in_url=storage.join(url, "metadata", "shards", "00000.parquet"),
        raw_url=storage.join(url, "raw"),
        shard_id=0,
        settings=config.download.model_dump(),
        samples_per_shard=10_000,
    )
    return storage.read_parquet(storage.join(url, "raw", "00000.parquet")).to_pylist()


def test_per_host_cap_holds_and_429s_are_retried_after_retry_after(
    server, client, images, tmp_path
):
    server.reset()
    urls = [f"http://{DEMO_HOST}/limited/{name}" for name in images[:12]]
    config = _config(server, max_per_host=RULE.in_flight, rate_limit_retries=3)
    ctx = _context(str(tmp_path / "run"), config, urls, client)

    run_stage(ctx)

    outcomes = latest_outcomes(ctx.run.url)
    assert outcomes["status"].to_pylist() == ["success"] * len(urls)
    # The cap held: the host never had more requests in flight than max_per_host, and the
    # threads did overlap (12 threads for 12 URLs, each request held 50 ms by the server).
    assert 2 <= server.max_in_flight <= RULE.in_flight
    # More than 5 requests a second were asked for: some were answered 429, every one of them
    # for exceeding the rate (never the in-flight limit), and retried no sooner than asked.
    answers = server.rate_limited_answers
    assert answers and all(a.status == 429 and a.retry_after == "1" for a in answers)
    for answer in answers:
        later = [t for t in server.request_times(answer.path) if t > answer.at]
        assert later, f"{answer.path} was not retried after its 429"
        assert later[0] - answer.at >= RULE.retry_after - 0.05, answer.path
    # Each shard counts its 429s per host; run.json's download record sums them.
    record = storage.read_json(ctx.path("run.json"))["stages"]["download"]
    assert record["http_429_by_host"] == {DEMO_HOST: len(answers)}
    # The audit counts them from the raw shards' markers, and the report lists the host.
    assert funnel(ctx.run.url).download.http_429_by_host == {DEMO_HOST: len(answers)}
    page = storage.read_bytes(write_report(ctx.run.url)).decode()
    table = page[page.index('id="rate-limits-table"') :]
    assert DEMO_HOST in table[: table.index("</table>")]


def test_retry_after_forms_and_when_to_give_up(server, images, tmp_path):
    server.reset()
    image = images[0]
    cases = {
        # (URL, expected category, requests the server gets)
        "seconds": (f"/busy/429/2/1/{image}", None, 3),
        "http date": (f"/busy/429/1/date/{image}", None, 2),
        "503 asking to wait": (f"/busy/503/1/1/{image}", None, 2),
        "503 without Retry-After": (f"/busy/503/1/none/{image}", "http_5xx", 1),
        "429 without Retry-After": (f"/busy/429/1/none/{image}", "rate_limited", 1),
        "asks longer than max_retry_after": (f"/busy/429/1/120/{image}", "rate_limited", 1),
        "still 429 after the retries": (f"/busy/429/9/0/{image}", "rate_limited", 3),
    }
    config = _config(server, rate_limit_retries=2, max_retry_after=30.0)
    urls = [f"http://{DEMO_HOST}{path}" for path, _, _ in cases.values()]
    rows = _shard_rows(str(tmp_path / "run"), config, urls)

    got = {case: row["error_category"] for case, row in zip(cases, rows, strict=True)}
    assert got == {case: category for case, (_, category, _) in cases.items()}
    counts = {case: server.request_count(path) for case, (path, _, _) in cases.items()}
    assert counts == {case: requests for case, (_, _, requests) in cases.items()}
    messages = {case: row["error_message"] for case, row in zip(cases, rows, strict=True)}
    assert messages["429 without Retry-After"].startswith("rate_limited:")
    assert "download.max_retry_after" in messages["asks longer than max_retry_after"]
    assert "download.rate_limit_retries" in messages["still 429 after the retries"]
    # The HTTP date was honoured as a delay, not taken for "now".
    date_path = cases["http date"][0]
    first, second = server.request_times(date_path)
    assert second - first >= BUSY_DATE_SECONDS - 1.05


def test_rate_limited_rows_are_retried_by_retry_failed(server, client, images, tmp_path):
    assert "rate_limited" in TRANSIENT_CATEGORIES
    server.reset()
    # Answered 429 three times: the first run's two tries fail, the retry round succeeds.
    path = f"/busy/429/3/0/{images[1]}"
    urls = [f"http://{DEMO_HOST}/img/{images[0]}", f"http://{DEMO_HOST}{path}"]
    config = _config(server, rate_limit_retries=1)
    ctx = _context(str(tmp_path / "run"), config, urls, client)
    run_stage(ctx)
    assert latest_outcomes(ctx.run.url)["error_category"].to_pylist() == [None, "rate_limited"]

    ctx.options["retry_failed"] = True
    run_stage(ctx)
    outcomes = latest_outcomes(ctx.run.url)
    assert outcomes["status"].to_pylist() == ["success", "success"]
    assert outcomes["attempts"].to_pylist() == [1, 2]
    assert server.request_count(path) == 4
    record = storage.read_json(ctx.path("run.json"))["stages"]["download"]
    assert record["http_429_by_host"] == {DEMO_HOST: 3}
