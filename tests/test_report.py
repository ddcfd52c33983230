"""The HTML report: self-contained, renders in headless Chromium with every section, shows hostile
captions and URLs as text, and its numbers agree with `stats` and with the files."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import numpy as np
import pytest
from PIL import Image

from laionface.audit import plots, report, sheets, stats
from laionface.audit.diff import diff
from laionface.audit.html import escape
from laionface.audit.sweep import sweep
from laionface.config import SelectSection
from laionface.io import storage
from tests import datasetrun
from tests.test_audit import HOSTILE_CAPTION, HOSTILE_URL, build_run, parse_stats
from tests.test_sweep import rerun

SECTION_IDS = [sid for sid, _ in report.SECTIONS]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, shared_faces) -> str:
    run = build_run(tmp_path_factory.mktemp("report"), shared_faces)
    report.write_report(run)
    return run


@pytest.fixture(scope="module")
def report_html(report_run) -> str:
    return Path(report_run, "audit", "report.html").read_text()


class Document(HTMLParser):
    """The parts of an HTML document the tests look at."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: list[str] = []
        self.text: list[str] = []
        self.title = ""
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if attributes.get("id"):
            self.ids.append(attributes["id"])
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_title:
            self.title += data


class Tables(HTMLParser):
    """Cell texts of every table with an id: {id: [[cell, ...], ...]} (header row excluded)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "table" and attributes.get("id"):
            self._table = attributes["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail(
            "headless Chromium is needed to check the report renders: install Debian's chromium"
            " package (apt-get install chromium); the test set-up does"
        )
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_report_renders_in_chromium_with_every_section(report_run, tmp_path):
    page = Path(report_run, "audit", "report.html").resolve().as_uri()
    dumped = _chromium(tmp_path, "--dump-dom", page)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    # Any script error, blocked load or CSP violation is logged as a CONSOLE message.
    console = [line for line in dumped.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
    dom = Document(dumped.stdout)
    for section in SECTION_IDS:
        assert section in dom.ids, f"section {section} missing from the rendered page"
    assert [tag for tag, _ in dom.tags if tag in ("script", "iframe", "object", "embed")] == []
    # The hostile caption did not run (the title is the report's) and shows as text.
    assert dom.title == "laionface report: audit <b>test</b>"
    text = "".join(dom.text)
    assert text.count(HOSTILE_CAPTION) >= 2  # a kept sample and a dropped one
    assert HOSTILE_URL in text  # among the download failure examples

    shot = tmp_path / "report.png"
    rendered = _chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", page)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20  # text, tables and plots, not a blank page


def test_report_needs_no_network(report_html):
    doc = Document(report_html)
    sources = [attrs["src"] for tag, attrs in doc.tags if "src" in attrs]
    assert sources and all(
        s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources
    )
    assert all(attrs["href"].startswith("#") for tag, attrs in doc.tags if "href" in attrs)
    assert [tag for tag, _ in doc.tags if tag in ("link", "script", "iframe", "base")] == []
    assert "url(" not in report_html and "@import" not in report_html
    # The page itself forbids anything but inline images and styles.
    policy = next(
        a["content"] for t, a in doc.tags if a.get("http-equiv") == "Content-Security-Policy"
    )
    assert policy.startswith("default-src 'none'")


def test_hostile_text_is_escaped():
    caption = "<script>alert(1)</script>\" onerror='x' &amp;"
    assert escape(caption) == (
        "&lt;script&gt;alert(1)&lt;/script&gt;&quot; onerror=&#x27;x&#x27; &amp;amp;"
    )
    long = "<" * 500
    escaped = escape(long, limit=300)
    assert escaped.endswith("&lt;\u2026") and "&l\u2026" not in escaped  # no entity cut
    assert plots.plot_label("cost $5 and $6") == r"cost \$5 and \$6"
    # NUL and a right-to-left override (which would make "gpj.exe" read "exe.jpg") are shown
    # as their code, not passed to the page.
    shown = escape("face\x00photo \u202egpj.exe\tok\n")
    assert shown == "face\\u0000photo \\u202egpj.exe\tok\n"


def test_report_numbers_agree_with_stats_and_files(report_run, report_html, capsys):
    tables = Tables(report_html).tables
    assert stats.stats_command(report_run) == 0
    printed = parse_stats(capsys.readouterr().out)
    shown = [
        (stage, reason, _number(count), float(pct[:-1]), float(pct_stage[:-1]))
        for stage, reason, count, pct, pct_stage in tables["funnel-table"]
    ]
    assert [
        (s, r if o == "dropped" else f"({'in' if o == 'input' else o})", n, p, q)
        for s, o, r, n, p, q in printed
    ] == shown

    db = duckdb.connect()
    latest = f"""
        select * from (
            select coalesce(retry_of, key) as input_key, url, status, error_category,
                   row_number() over (partition by coalesce(retry_of, key)
                                      order by filename desc) as attempt
            from read_parquet('{report_run}/raw/*.parquet', filename=true))
        where attempt = 1 and status <> 'success'
    """
    failures = dict(
        db.execute(f"select error_category, count(*) from ({latest}) group by 1").fetchall()
    )
    assert {row[0]: _number(row[1]) for row in tables["download-failures-table"]} == failures

    urls = [row[0] for row in db.execute(f"select url from ({latest})").fetchall()]
    by_domain: dict[str, int] = {}
    for url in urls:
        host = (urlsplit(url).hostname or "").lower()
        by_domain[host] = by_domain.get(host, 0) + 1
    assert {row[0]: _number(row[2]) for row in tables["domains-table"]} == by_domain

    decisions = f"'{report_run}/dedup/decisions.parquet'"
    dedup = dict(
        db.execute(f"select reason, count(*) from {decisions} where not kept group by 1").fetchall()
    )
    assert {row[0]: _number(row[1]) for row in tables["duplicates-table"]} == dedup

    sizes = storage.read_json(f"{report_run}/dataset/sizes.json")
    assert {row[0] + ".tar": _number(row[1]) for row in tables["dataset-shards-table"]} == sizes

    faces = f"'{report_run}/faces/*.parquet'"
    per_image = dict(db.execute(f"select len(faces), count(*) from {faces} group by 1").fetchall())
    assert {
        _number(row[0]): _number(row[1]) for row in tables["faces-per-image-table"]
    } == per_image


def _section(html_text: str, section: str) -> str:
    """The HTML of one section of the report."""
    start = html_text.index(f'<section id="{section}">')
    return html_text[start : html_text.index("</section>", start)]


def _cards(html_text: str) -> dict[str, list[str]]:
    """{section or reason anchor: [data-key of each card]} in page order."""
    out: dict[str, list[str]] = {}
    current = None
    for match in re.finditer(
        r'<(?:section|h3) id="([^"]+)"|<div class="card(?: keeper)?" data-key="([^"]+)"', html_text
    ):
        if match.group(1):
            current = match.group(1)
        else:
            out.setdefault(current, []).append(match.group(2))
    return out


def test_contact_sheets_show_kept_and_dropped_images(report_run, report_html):
    cards = _cards(report_html)
    db = duckdb.connect()
    decisions = f"'{report_run}/dedup/decisions.parquet'"
    kept = {k for (k,) in db.execute(f"select key from {decisions} where kept").fetchall()}
    # Fewer kept images than the sheet holds: every one is shown, each once.
    assert len(kept) < sheets.KEPT_SAMPLES
    assert sorted(cards["kept-samples"]) == sorted(kept)
    reasons = dict(
        db.execute(
            f"""select key, reason from '{report_run}/select/*.parquet' where not kept
                union all select key, reason from {decisions} where not kept"""
        ).fetchall()
    )
    shown = 0
    for reason in set(reasons.values()):
        keys = cards[report._anchor(reason)]
        assert keys and all(reasons[k] == reason for k in keys)
        shown += len(keys)
    assert shown == len(reasons)  # every reason has fewer images than its sheet holds
    # Decodable images have thumbnails; undecodable ones say why.
    sheets_html = _section(report_html, "kept-samples") + _section(report_html, "dropped-samples")
    images = re.findall(r'<div class="card" data-key="[^"]+"><img', sheets_html)
    decode_errors = [k for k, r in reasons.items() if r == "decode_error"]
    assert len(images) == len(kept) + len(reasons) - len(decode_errors)
    assert sheets_html.count("decode error: decode_failed") == len(decode_errors)


def test_boxes_are_drawn_in_the_thumbnail_frame():
    image = Image.new("RGB", (800, 400), (128, 128, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    rules = SelectSection(min_score=0.9, min_face_size=50)
    faces = [
        {"x1": 100.0, "y1": 100.0, "x2": 300.0, "y2": 300.0, "score": 0.99},  # counted
        {"x1": 500.0, "y1": 100.0, "x2": 530.0, "y2": 130.0, "score": 0.99},  # too small
        {"x1": 600.0, "y1": 200.0, "x2": 700.0, "y2": 300.0, "score": 0.6},  # low score
    ]
    uri, why = sheets.thumbnail(buffer.getvalue(), faces, 800, 400, rules, 10**8)
    assert why == ""
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    assert thumb.size == (sheets.THUMB_SIDE, sheets.THUMB_SIDE // 2)
    scale = sheets.THUMB_SIDE / 800

    def near(x: float, y: float, color: tuple[int, int, int]) -> bool:
        pixel = np.asarray(thumb, dtype=int)[round(y * scale), round(x * scale)]
        return bool(np.abs(pixel - np.array(color)).max() < 60)

    assert near(100, 200, sheets.GREEN)  # left edge of the counted face
    assert near(500, 115, sheets.ORANGE)
    assert near(600, 250, sheets.RED)
    assert near(200, 200, (128, 128, 128))  # inside a box: untouched


def test_report_is_deterministic(report_run, report_html):
    assert report.build_report(report_run) == report_html


def test_a_report_on_an_inconsistent_run_says_so(report_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(report_run, run)
    url = f"{run}/select/00000.parquet"
    storage.write_parquet(storage.read_parquet(url).slice(2), url)
    assert report.report_command(run) == 1
    captured = capsys.readouterr()
    assert "select: raw shards 00000 don't add up" in captured.err
    text = Path(run, "audit", "report.html").read_text()
    assert '<div class="problem">' in text and "select/00000.parquet" in text


def test_a_partial_run_still_has_every_section(report_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(
        report_run, run, ignore=shutil.ignore_patterns("faces", "select", "dedup", "dataset")
    )
    text = report.build_report(run)
    doc = Document(text)
    assert all(section in doc.ids for section in SECTION_IDS)
    assert "No data: the faces stage has no output" in text
    assert "Stages without output: faces, select, dedup, emit." in text


# ---------------------------------------------------------------------------------------------
# The sections on how the run was made and what it kept: the demo run, compared with a copy
# re-selected with stricter thresholds, two cards per drop reason.


@pytest.fixture(scope="module")
def compared(tmp_path_factory, demo_corpus) -> tuple[Path, Path, str]:
    """(the demo run, the stricter copy, the report's text as headless Chromium renders it)."""
    demo = datasetrun.demo_run(tmp_path_factory, demo_corpus)
    folder = tmp_path_factory.mktemp("compared")
    stricter = rerun(demo, demo_corpus, folder, "select.min_score=0.95", "select.min_face_size=48")
    out = folder / "report.html"
    code = report.report_command(str(demo), out=str(out), samples=2, compare=str(stricter))
    assert code == 0
    dumped = _chromium(folder, "--dump-dom", out.resolve().as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert [line for line in dumped.stderr.splitlines() if "CONSOLE" in line] == []
    return demo, stricter, dumped.stdout


def test_the_new_sections_render_in_chromium(compared):
    _, _, dom = compared
    assert all(section in Document(dom).ids for section in SECTION_IDS)
    for section, images in (("kept-data", 2), ("threshold-sweep", 1), ("timings", 1)):
        assert _section(dom, section).count('src="data:image/png;base64,') >= images, section
    assert "No run to compare with" not in dom


def test_settings_versions_and_timings_come_from_run_json_and_the_markers(compared):
    demo, _, dom = compared
    tables = Tables(dom).tables
    record = storage.read_json(f"{demo}/run.json")
    assert ["select", "select.min_score", "0.9"] in tables["settings-table"]
    assert ["dedup", "dedup.max_distance", "4"] in tables["settings-table"]
    versions = {row[0]: row[1] for row in tables["versions-table"]}
    assert versions["laionface"] == record["versions"]["laionface"]
    timings = {row[0]: row for row in tables["timings-table"]}
    assert set(timings) == set(record["stages"])
    faces = timings["faces"]
    assert faces[4] == f"{record['stages']['faces']['seconds']:,.1f}"
    markers = [
        storage.read_json(str(p))["stats"]["seconds"]
        for p in Path(demo, "faces", "_done").glob("*.json")
    ]
    assert faces[7] == f"{max(markers):,.2f}"


def test_kept_data_by_license_nsfw_and_domain_agree_with_the_files(compared):
    demo, _, dom = compared
    tables = Tables(dom).tables
    db = duckdb.connect()
    dataset, given = f"'{demo}/dataset/0*.parquet'", f"'{demo}/metadata/shards/*.parquet'"
    for table, column in (("license-table", "LICENSE"), ("nsfw-table", "NSFW")):
        kept = dict(db.execute(f"select {column}, count(*) from {dataset} group by 1").fetchall())
        rows = dict(db.execute(f"select {column}, count(*) from {given} group by 1").fetchall())
        shown = {row[0]: (_number(row[1]), _number(row[2])) for row in tables[table]}
        assert shown == {name: (kept.get(name, 0), n) for name, n in rows.items()}
    host = "lower(regexp_extract({}, '^[a-z]+://([^/:]+)', 1))"
    kept = dict(
        db.execute(f"select {host.format('url')}, count(*) from {dataset} group by 1").fetchall()
    )
    rows = dict(
        db.execute(f"select {host.format('URL')}, count(*) from {given} group by 1").fetchall()
    )
    shown = {row[0]: (_number(row[1]), _number(row[2])) for row in tables["kept-domains-table"]}
    assert shown == {domain: (n, rows[domain]) for domain, n in kept.items()}


def test_face_sizes_per_select_decision_agree_with_the_files(compared):
    demo, _, dom = compared
    db = duckdb.connect()
    counted = db.execute(
        f"""select coalesce(s.reason, 'kept by select'), count(*), sum(len(f.faces))
            from '{demo}/faces/*.parquet' f join '{demo}/select/*.parquet' s using (key)
            group by 1"""
    ).fetchall()
    shown = Tables(dom).tables["face-size-by-reason-table"]
    assert {row[0]: (_number(row[1]), _number(row[2])) for row in shown} == {
        reason: (images, detections) for reason, images, detections in counted
    }


def test_the_sweep_section_shows_the_sweep(compared):
    demo, _, dom = compared
    result = sweep(str(demo))
    shown = Tables(dom).tables["sweep-table"]
    keys = len(result.grid.keys)
    assert len(shown) == len(result.points)
    for row, point in zip(shown, result.points, strict=True):
        assert [float(v) for v in row[:keys]] == [float(v) for v in point.settings.values()]
        assert (_number(row[keys]), _number(row[keys + 1])) == (
            point.select_kept,
            point.select_faces,
        )
        if point.dedup_kept is not None:
            assert _number(row[keys + 2]) == point.dedup_kept
        else:
            assert row[keys + 2] == f"\u2264{point.dedup_kept_at_most:,}"
        assert (row[-1] == "the run's") == point.is_run


def test_each_cluster_shows_its_keeper_beside_the_images_it_dropped(compared):
    demo, _, dom = compared
    decisions = {
        row["key"]: row
        for row in storage.read_parquet(f"{demo}/dedup/decisions.parquet").to_pylist()
    }
    section = _section(dom, "duplicate-images")
    clusters = {k: v for k, v in _cards(section).items() if k.startswith("cluster-")}
    assert clusters
    sizes = {}
    for row in decisions.values():
        sizes[row["cluster"]] = sizes.get(row["cluster"], 0) + 1
    assert len(clusters) == sum(1 for n in sizes.values() if n > 1)  # all, on the demo
    for anchor, (keeper, *dropped) in clusters.items():
        assert f'<div class="card keeper" data-key="{keeper}">' in section
        assert decisions[keeper]["kept"] and anchor == f"cluster-{decisions[keeper]['cluster']}"
        assert dropped and all(decisions[k]["duplicate_of"] == keeper for k in dropped)
        assert len(dropped) == sizes[decisions[keeper]["cluster"]] - 1


def test_samples_sets_the_cards_per_drop_reason(compared):
    demo, _, dom = compared
    cards = _cards(_section(dom, "dropped-samples"))
    db = duckdb.connect()
    reasons = db.execute(
        f"""select reason, count(*) from (
                select reason from '{demo}/select/*.parquet' where not kept
                union all
                select reason from '{demo}/dedup/decisions.parquet' where not kept)
            group by 1"""
    ).fetchall()
    assert {reason: len(cards[report._anchor(reason)]) for reason, _ in reasons} == {
        reason: min(2, n) for reason, n in reasons
    }


def test_the_compare_section_is_the_diff(compared):
    demo, stricter, dom = compared
    result = diff(str(demo), str(stricter))
    tables = Tables(dom).tables
    shown = [(row[0], _number(row[2]), _number(row[3])) for row in tables["compare-funnel-table"]]
    assert shown == [(r["stage"], r["a"], r["b"]) for r in result.funnel]
    keys = {row[0]: _number(row[1]) for row in tables["compare-keys-table"]}
    assert keys == {
        "kept by A, not by B": result.keys.counts["A"],
        "kept by B, not by A": result.keys.counts["B"],
    }
    assert ["stage select", "select.min_score", "0.9", "0.95"] in tables["compare-settings-table"]
