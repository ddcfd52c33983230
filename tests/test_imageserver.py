"""The demo image server, for real on 127.0.0.1, fetched with urllib and http.client."""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionface.demo.corpus import DEMO_HOST
from laionface.demo.imageserver import (
    BUSY_DATE_SECONDS,
    HTML_PAGE,
    PRIVATE_REDIRECT_TARGET,
    ImageServer,
    RateLimit,
)
from tests.imageservers import CountingImageServer

SLOW_SECONDS = 1.5
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


@pytest.fixture(scope="module")
def truth(demo_corpus) -> list[dict]:
    return pq.read_table(demo_corpus.truth_path).to_pylist()


@pytest.fixture()
def server(demo_corpus):
    with CountingImageServer(demo_corpus.root, slow_seconds=SLOW_SECONDS) as running:
        yield running


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


_no_redirect = urllib.request.build_opener(_NoRedirect)


def _get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one GET, not following redirects; errors are answers too."""
    try:
        with _no_redirect.open(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _rows(truth: list[dict], case: str) -> list[dict]:
    rows = [row for row in truth if row["case"] == case]
    assert rows, f"the demo corpus has no {case} row"
    return rows


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_images_are_served_with_their_bytes_and_type(server, truth):
    for row in _rows(truth, "ok") + _rows(truth, "too_small"):
        status, headers, body = _get(server.url(row["URL"]))
        assert status == 200, row["URL"]
        assert _sha256(body) == row["sha256"], row["URL"]
        assert headers["Content-Type"] == CONTENT_TYPES[row["format"]]
        assert int(headers["Content-Length"]) == len(body)


def test_missing_images_are_404_and_errors_are_their_5xx(server, truth):
    for row in _rows(truth, "http_404"):
        status, _, _ = _get(server.url(row["URL"]))
        assert status == 404, row["URL"]
    codes = set()
    for row in _rows(truth, "http_5xx"):
        status, _, _ = _get(server.url(row["URL"]))
        assert status == int(row["path"].split("/")[2]), row["URL"]
        codes.add(status)
    assert 500 in codes


def test_html_instead_of_an_image(server, truth):
    for row in _rows(truth, "not_an_image"):
        status, headers, body = _get(server.url(row["URL"]))
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert body == HTML_PAGE
        assert _sha256(body) == row["sha256"]


def test_truncated_jpeg_is_the_first_half(server, truth, demo_corpus):
    for row in _rows(truth, "truncated"):
        status, headers, body = _get(server.url(row["URL"]))
        whole = (demo_corpus.images_dir / row["file"]).read_bytes()
        assert status == 200
        assert headers["Content-Type"] == "image/jpeg"
        assert body == whole[: len(whole) // 2]
        assert int(headers["Content-Length"]) == len(body)
        assert _sha256(body) == row["sha256"]


def test_opted_out_images_carry_x_robots_tag_noai(server, truth):
    for row in _rows(truth, "opted_out"):
        status, headers, body = _get(server.url(row["URL"]))
        assert status == 200
        assert headers["X-Robots-Tag"] == "noai"
        assert _sha256(body) == row["sha256"]
    plain = _rows(truth, "ok")[0]
    assert "X-Robots-Tag" not in _get(server.url(plain["URL"]))[1]


def test_flaky_fails_first_then_succeeds_and_reset_starts_again(server, truth):
    row = _rows(truth, "flaky")[0]
    url = server.url(row["URL"])
    assert _get(url)[0] == 500
    status, _, body = _get(url)
    assert status == 200 and _sha256(body) == row["sha256"]
    assert _get(url)[0] == 200
    assert server.request_count(row["URL"]) == 3
    server.reset()
    assert server.request_count(row["URL"]) == 0
    assert _get(url)[0] == 500


def test_flaky_count_is_per_server_instance(demo_corpus, truth):
    row = _rows(truth, "flaky")[0]
    for _ in range(2):
        with ImageServer(demo_corpus.root) as fresh:
            assert _get(fresh.url(row["URL"]))[0] == 500


def test_busy_asks_to_come_back_later_then_serves_the_file(server, truth):
    row = _rows(truth, "ok")[0]
    name = row["file"]
    path = f"/busy/429/2/3/{name}"
    for _ in range(2):
        status, headers, _ = _get(server.url(path))
        assert (status, headers["Retry-After"]) == (429, "3")
    status, _, body = _get(server.url(path))
    assert status == 200 and _sha256(body) == row["sha256"]

    status, headers, _ = _get(server.url(f"/busy/503/1/date/{name}"))
    asked = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp() - time.time()
    assert status == 503 and BUSY_DATE_SECONDS - 1.5 < asked <= BUSY_DATE_SECONDS
    status, headers, _ = _get(server.url(f"/busy/429/1/none/{name}"))
    assert status == 429 and "Retry-After" not in headers
    for bad in (f"/busy/500/1/1/{name}", f"/busy/429/1/soon/{name}", "/busy/429/1/1/missing.jpg"):
        assert _get(server.url(bad))[0] == 404, bad

    answers = server.rate_limited_answers
    assert [(a.path, a.status) for a in answers] == [
        (path, 429),
        (path, 429),
        (f"/busy/503/1/date/{name}", 503),
        (f"/busy/429/1/none/{name}", 429),
    ]
    server.reset()
    assert server.rate_limited_answers == []
    assert _get(server.url(path))[0] == 429


def test_limited_host_refuses_past_its_in_flight_limit_and_counts_concurrency(demo_corpus, truth):
    row = _rows(truth, "ok")[0]
    rule = RateLimit(in_flight=2, per_second=100, retry_after=7, hold_seconds=2.0)
    with ImageServer(demo_corpus.root, rate_limit=rule) as server:
        url = server.url(f"/limited/{row['file']}")
        start = threading.Barrier(5)
        answers: list[tuple[int, dict[str, str], bytes]] = []

        def client() -> None:
            start.wait()
            answers.append(_get(url, timeout=30))

        threads = [threading.Thread(target=client) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        # Two let through (held 2 s each, so all five overlap them), three refused at once.
        assert sorted(status for status, _, _ in answers) == [200, 200, 429, 429, 429]
        assert all(h["Retry-After"] == "7" for status, h, _ in answers if status == 429)
        assert all(_sha256(b) == row["sha256"] for status, _, b in answers if status == 200)
        assert server.max_in_flight >= 2
        assert len(server.rate_limited_answers) == 3


def test_limited_host_refuses_past_its_rate(demo_corpus, truth):
    row = _rows(truth, "ok")[0]
    rule = RateLimit(in_flight=100, per_second=3, retry_after=1, hold_seconds=0.0)
    with ImageServer(demo_corpus.root, rate_limit=rule) as server:
        first_second = int(time.monotonic())  # the server's clock seconds
        statuses = [_get(server.url(f"/limited/{row['file']}"))[0] for _ in range(10)]
        seconds = int(time.monotonic()) - first_second + 1
    # At most 3 let through in each clock second the requests spanned, the first 3 always.
    assert statuses[:3] == [200] * 3
    assert statuses.count(200) <= 3 * seconds
    assert statuses.count(429) == 10 - statuses.count(200) >= 10 - 3 * seconds


def test_redirects_stay_on_the_requested_host_or_point_at_link_local(server, truth):
    for row in _rows(truth, "redirect"):
        status, headers, _ = _get(server.url(row["URL"]))
        assert status == 302
        assert headers["Location"] == f"/img/{row['file']}"
        # urllib follows the relative Location on the same host and port.
        with urllib.request.urlopen(server.url(row["URL"]), timeout=5) as response:
            assert response.url == f"{server.base_url}/img/{row['file']}"
            assert _sha256(response.read()) == row["sha256"]
    for row in _rows(truth, "redirect_private"):
        status, headers, _ = _get(server.url(row["URL"]))
        assert status == 302
        assert (
            headers["Location"]
            == PRIVATE_REDIRECT_TARGET
            == ("http://169.254.169.254/latest/meta-data/")
        )


def test_slow_response_trips_a_shorter_client_timeout(server, truth):
    row = _rows(truth, "timeout")[0]
    start = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)) as caught:
        urllib.request.urlopen(server.url(row["URL"]), timeout=0.5)
    if isinstance(caught.value, urllib.error.URLError):
        assert isinstance(caught.value.reason, (TimeoutError, socket.timeout))
    assert time.monotonic() - start < SLOW_SECONDS
    # A patient client gets the image after slow_seconds.
    start = time.monotonic()
    status, _, body = _get(server.url(row["URL"]), timeout=SLOW_SECONDS + 5)
    assert status == 200 and _sha256(body) == row["sha256"]
    assert time.monotonic() - start >= SLOW_SECONDS


def test_routes_by_path_only_whatever_the_host_header_over_keep_alive(server, truth):
    row = _rows(truth, "ok")[0]
    data = (server.images_dir / row["file"]).read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    sockets = set()
    try:
        for method in ("GET", "HEAD", "GET"):
            conn.request(method, row["path"], headers={"Host": DEMO_HOST})
            response = conn.getresponse()
            body = response.read()
            sockets.add(id(conn.sock))
            assert response.status == 200 and not response.will_close
            assert int(response.getheader("Content-Length")) == len(data)
            assert body == (b"" if method == "HEAD" else data)
    finally:
        conn.close()
    assert len(sockets) == 1  # one connection served all three requests
    assert server.resolve_map == {DEMO_HOST: f"127.0.0.1:{server.port}"}
    assert server.base_url == f"http://127.0.0.1:{server.port}"


def test_query_strings_are_ignored_and_counted_under_the_path(server, truth):
    with_query = [row for row in _rows(truth, "ok") if "?" in row["URL"]]
    assert with_query, "the corpus should hold a few URLs with a query string"
    row = with_query[0]
    status, _, body = _get(server.url(row["URL"]))
    assert status == 200 and _sha256(body) == row["sha256"]
    assert server.request_count(row["path"]) == 1
    assert server.requests == {row["path"]: 1}


def test_nothing_outside_images_is_served(server):
    for path in (
        "/img/../corpus.json",
        "/img/%2e%2e/corpus.json",
        "/corpus.json",
        "/img/",
        "/img/a/b.jpg",
        "/flaky/x/000000.jpg",
        "/error/404/x.jpg",
        "/",
    ):
        assert _get(f"{server.base_url}{path}")[0] == 404, path


def test_stop_is_prompt_while_a_handler_sleeps(demo_corpus, truth):
    row = _rows(truth, "timeout")[0]
    server = CountingImageServer(demo_corpus.root, slow_seconds=60).start()
    url = server.url(row["URL"])
    outcome: list[object] = []

    def client() -> None:
        try:
            outcome.append(_get(url, timeout=30)[0])
        except Exception as error:  # the dropped connection is the expected answer
            outcome.append(error)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while server.request_count(row["path"]) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.request_count(row["path"]) == 1, "the slow request never reached the server"
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 5
    thread.join(5)
    assert outcome and outcome[0] != 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_is_quiet_on_stderr_even_when_clients_hang_up(server, truth, capfd):
    row = _rows(truth, "timeout")[0]
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        urllib.request.urlopen(server.url(row["URL"]), timeout=0.2)
    _get(server.url("/img/does-not-exist.jpg"))
    time.sleep(SLOW_SECONDS + 0.5)  # the slow handler now writes to a closed socket
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_start_stop_and_errors(demo_corpus, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="images"):
        ImageServer(tmp_path)
    server = ImageServer(demo_corpus.root)
    with pytest.raises(RuntimeError, match="start"):
        _ = server.port
    server.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
    finally:
        server.stop()
    server.stop()  # stopping twice is harmless
