"""The `laionface` command: every subcommand explains itself, errors are clear, exit codes right."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionface.cli import COMMANDS, build_parser, main
from laionface.config import load_config
from laionface.demo.corpus import DEMO_HOST
from laionface.demo.imageserver import ImageServer
from laionface.engine.runner import _Progress
from laionface.layout import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "pipelines" / "demo.toml")


def laionface(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "laionface", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"laionface {command}" in out


def test_config_error_exits_2_and_names_the_key(tmp_path):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("[faces]\nbatch_size = 0\n")
    done = laionface("run", str(pipeline), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "faces.batch_size" in done.stderr and str(pipeline) in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_stage_is_a_clear_error(tmp_path):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("")
    done = laionface("run", str(pipeline), "--run-dir", str(tmp_path / "r"), "--stages", "facez")
    assert done.returncode == 2
    assert "unknown stage(s) facez" in done.stderr and "metadata, download" in done.stderr
    assert "Traceback" not in done.stderr


def test_verify_of_a_missing_folder_says_so(tmp_path):
    done = laionface("verify", str(tmp_path / "nothing"))
    assert done.returncode == 1
    assert "nothing" in done.stderr and "Traceback" not in done.stderr


def test_reference_command_hashes_a_folder(tmp_path, shared_faces):
    out = tmp_path / "eval.parquet"
    done = laionface("reference", str(shared_faces), "--out", str(out))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.num_rows == 8 and set(table.column_names) >= {"phash", "item"}


def demo_run_args(corpus, run: Path, *settings: str) -> list[str]:
    """`laionface run` of the demo pipeline on the demo corpus into `run`."""
    args = ["run", DEMO, "--run-dir", str(run)]
    for setting in (
        f"metadata.input={json.dumps([str(corpus.metadata_path)])}",
        "cluster.dashboard_address=''",
        *settings,
    ):
        args += ["--set", setting]
    return args


@pytest.fixture(scope="module")
def metadata_run(tmp_path_factory, demo_corpus):
    """The metadata stage of the demo, run by the command with its stderr piped (no terminal)
    and --log-format json given after the subcommand."""
    run = tmp_path_factory.mktemp("cli") / "run"
    done = laionface(
        *demo_run_args(demo_corpus, run), "--stages", "metadata", "--log-format", "json"
    )
    assert done.returncode == 0, done.stderr
    return run, done


def test_log_lines_are_json_and_progress_is_not_drawn_without_a_terminal(metadata_run):
    _, done = metadata_run
    assert "\r" not in done.stderr  # no progress bar frames in a log
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["message"].startswith("metadata/parts: 1/1 shards complete") for r in records)


def test_progress_is_logged_every_so_often_without_a_terminal(capsys, caplog):
    caplog.set_level(logging.INFO, logger="laionface")
    progress = _Progress("faces", total=3, initial=0, unit="images", enabled=True, every=0)
    for _ in range(3):
        progress.add(10)
        progress.update()
    progress.close()
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no bar
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["faces: 1/3 shards", "faces: 2/3 shards"]
    assert all("images/s" in line for line in lines)


def test_stats_json_is_the_funnel(metadata_run, capsys):
    run, _ = metadata_run
    assert main(["stats", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "metadata" / "summary.json").read_text())
    assert data["run"] == str(run) and data["conservation"] == "ok"
    assert data["input_rows"] == summary["input_rows"] == 360
    assert data["stages"][0] == {
        "stage": "metadata",
        "input": summary["input_rows"],
        "kept": summary["kept_rows"],
        "dropped": summary["dropped"],
    }
    kept_row = next(r for r in data["rows"] if r["outcome"] == "kept")
    assert kept_row["count"] == summary["kept_rows"]


def test_log_options_are_accepted_before_or_after_the_command(metadata_run, demo_corpus):
    parser = build_parser()
    for argv in (["-v", "stats", "r"], ["stats", "r", "-v"]):
        assert parser.parse_args(argv).verbose
    for argv in (
        ["--log-level", "warning", "--log-format", "json", "stats", "r"],
        ["stats", "r", "--log-level", "WARNING", "--log-format", "json"],
    ):
        args = parser.parse_args(argv)
        assert (args.log_level, args.log_format) == ("WARNING", "json")
    assert parser.parse_args(["stats", "r"]).log_level is None
    run, _ = metadata_run
    # An INFO line of a run ("metadata/parts: ...") is not shown at WARNING.
    quiet = laionface(
        "--log-level", "WARNING", *demo_run_args(demo_corpus, run), "--stages", "metadata"
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "metadata/parts" not in quiet.stderr and "run folder:" in quiet.stdout


def test_stats_help_has_no_doubled_percent_and_stages_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        main(["stats", "--help"])
    out = capsys.readouterr().out
    assert "% of input" in out and "%%" not in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert ", ".join(STAGE_ORDER) in " ".join(capsys.readouterr().out.split())


def test_config_command_prints_the_resolved_config_that_loads_again(tmp_path, capsys):
    overrides = ["select.max_faces=none", 'download.resolve={"images.example.test" = "1.2.3.4:80"}']
    argv = ["config", DEMO]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "batch_size = 16" in text and "max_image_pixels = 50000000" in text  # a default
    printed = tmp_path / "resolved.toml"
    printed.write_text(text)
    assert load_config(printed) == load_config(DEMO, overrides)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_inputs_and_an_unknown_scheduler_stop_the_run_before_it_writes(
    tmp_path, demo_corpus, capsys
):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    cases = {
        "metadata.input is empty": ["--set", "metadata.input=[]"],
        "does not exist": ["--set", f"metadata.input={json.dumps([str(tmp_path / 'nope')])}"],
        "not a readable parquet file": ["--set", f"metadata.input={json.dumps([str(garbage)])}"],
        "no Dask scheduler answers": ["--scheduler", f"tcp://127.0.0.1:{_free_port()}"],
    }
    for expected, extra in cases.items():
        run = tmp_path / "run"
        assert main([*demo_run_args(demo_corpus, run), *extra]) == 2, expected
        assert expected in capsys.readouterr().err
        assert not run.exists(), f"{expected}: the run wrote {sorted(run.rglob('*'))}"


def test_sigterm_stops_a_run_and_is_written_in_its_log(tmp_path, demo_corpus):
    run = tmp_path / "run"
    with ImageServer(demo_corpus.root) as server:
        resolve = f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}'
        command = [sys.executable, "-m", "laionface", *demo_run_args(demo_corpus, run, resolve)]
        command += ["--stages", "metadata,download"]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the download stage never started"
            state = (
                json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
            )
            if state.get("stages", {}).get("download", {}).get("status") == "running":
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted: re-run the same command to resume" in err
    (log_file,) = (run / "logs").iterdir()
    assert "interrupted by SIGTERM" in log_file.read_text()
    state = json.loads((run / "run.json").read_text())
    assert state["stages"]["download"]["status"] == "failed"
    assert not (run / "lease.json").exists()
