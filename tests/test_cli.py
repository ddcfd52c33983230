"""The `laionface` command: every subcommand explains itself, errors are clear, exit codes right."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from laionface.cli import COMMANDS, main


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
