"""Pipeline configs: clear errors that name the file and key, --set overrides, shipped pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest

from laionface.config import Config, ConfigError, config_toml, load_config
from laionface.engine.pipeline import stage_of

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipe.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo", "laion-face-50m", "laion-face-20m"])
def test_shipped_pipelines_load_and_comment_every_key(name):
    path = PIPELINES / f"{name}.toml"
    config = load_config(path)
    assert isinstance(config, Config)
    previous = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith(("#", '"')):
            commented = "#" in stripped or previous.startswith("#")
            assert commented, f"{path.name}: key without a comment: {stripped}"
        previous = stripped


def test_laion_face_recipe_values():
    full = load_config(PIPELINES / "laion-face-50m.toml")
    assert full.download.resize_mode == "no"
    assert full.download.thread_count == 128
    assert set(full.download.save_additional_columns) == {
        "NSFW",
        "similarity",
        "LICENSE",
        "SAMPLE_ID",
    }
    assert full.faces.network == "mobilenet0.25"
    small = load_config(PIPELINES / "laion-face-20m.toml")
    parts = sorted(int(p.split("part-")[1][:5]) for p in small.metadata.input)
    assert parts == [0, 2, 5, 8, 13, 15, 17, 18, 21, 22, 24, 25, 28]


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    path = _write(tmp_path, "[faces]\nbatch_sise = 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "faces.batch_sise" in message
    assert "batch_size" in message  # the allowed keys are listed


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'facez'.*allowed keys: .*faces"):
        load_config(_write(tmp_path, "[facez]\nbatch_size = 4\n"))


def test_wrong_type_and_out_of_range(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, '[faces]\nbatch_size = "many"\n[select]\nmin_score = 1.5\n'))
    message = str(err.value)
    assert "faces.batch_size" in message and "'many'" in message
    assert "select.min_score" in message and "less than or equal to 1" in message


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"faces.device.*'auto', 'cpu' or 'cuda'"):
        load_config(_write(tmp_path, '[faces]\ndevice = "tpu"\n'))


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = _write(tmp_path, "[faces]\nbatch_size = 4\n")
    config = load_config(
        path,
        [
            "faces.batch_size=64",
            "run.name=my-run",
            'metadata.nsfw=["UNLIKELY"]',
            'download.resolve={"example.test" = "127.0.0.1:8080"}',
        ],
    )
    assert config.faces.batch_size == 64
    assert config.run.name == "my-run"
    assert config.metadata.nsfw == ["UNLIKELY"]
    assert config.download.resolve == {"example.test": "127.0.0.1:8080"}
    with pytest.raises(ConfigError, match="faces.batch_size"):
        load_config(path, ["faces.batch_size=0"])
    with pytest.raises(ConfigError, match="unknown key 'faces.nope'"):
        load_config(path, ["faces.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["faces.batch_size"])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[faces\n"))


def test_a_stage_fingerprints_the_settings_it_declares_and_no_other():
    faces, select, emit = (stage_of(name) for name in ("faces", "select", "emit"))
    base = Config()
    changed_select = Config()
    changed_select.select.min_score = 0.5
    assert faces.fingerprint(base) == faces.fingerprint(changed_select)
    assert select.fingerprint(base) != select.fingerprint(changed_select)
    # emit publishes the detections scoring at least select.min_score.
    assert emit.fingerprint(base) != emit.fingerprint(changed_select)
    changed_size = Config()
    changed_size.select.min_face_size = 10
    assert emit.fingerprint(base) == emit.fingerprint(changed_size)
    faster = Config()
    faster.faces.batch_size = 128
    assert faces.fingerprint(base) == faces.fingerprint(faster)


def test_resolved_config_validates_again():
    config = Config()
    config.download.max_image_area = float("inf")
    again = Config.model_validate(config.resolved())
    assert again == config


def test_an_unbalanced_set_value_is_an_error_naming_the_key(tmp_path):
    path = _write(tmp_path, "")
    for value in ('["UNLIKELY"', '"UNLIKELY', "{a = 1", "[1, 2", "my run"):
        with pytest.raises(ConfigError) as err:
            load_config(path, [f"metadata.nsfw={value}"])
        message = str(err.value)
        assert "metadata.nsfw" in message and "brackets and quotes" in message, message
    with pytest.raises(ConfigError, match="run.name=: no value"):
        load_config(path, ["run.name="])
    with pytest.raises(ConfigError, match="one value only"):
        load_config(path, ['run.name="a"\nfaces.batch_size=3'])


def test_bare_words_are_strings(tmp_path):
    config = load_config(
        _write(tmp_path, ""),
        [
            "run.name=my-run",
            "cluster.scheduler=tcp://10.0.0.5:8786",
            "metadata.input=data/part-*.parquet",
            "run.run_dir=s3://bucket/runs/x",
        ],
    )
    assert config.run.name == "my-run"
    assert config.cluster.scheduler == "tcp://10.0.0.5:8786"
    assert config.metadata.input == ["data/part-*.parquet"]
    assert config.run.run_dir == "s3://bucket/runs/x"


def test_none_unsets_an_optional_key_and_is_an_error_for_any_other(tmp_path):
    path = _write(tmp_path, "[select]\nmax_faces = 8\n[metadata]\nmin_side = 64\n")
    assert load_config(path).select.max_faces == 8
    config = load_config(path, ["select.max_faces=none", "metadata.min_side=none"])
    assert config.select.max_faces is None and config.metadata.min_side is None
    with pytest.raises(ConfigError) as err:
        load_config(path, ["select.min_score=none"])
    message = str(err.value)
    assert "select.min_score is not optional" in message and "0.9" in message
    assert """--set 'select.min_score="none"'""" in message  # how to give the string
    assert load_config(path, ['run.name="none"']).run.name == "none"
    with pytest.raises(ConfigError, match=r"\[select\] is a section"):
        load_config(path, ["select=none"])


@pytest.mark.parametrize("name", ["demo", "laion-face-50m", "laion-face-20m"])
def test_the_resolved_config_as_toml_loads_as_the_same_config(name, tmp_path):
    overrides = [
        "select.max_faces=none",
        'download.resolve={"images.example.test" = "127.0.0.1:8080"}',
        "faces.resources={GPU = 1}",
        'run.name="quote \\" and \\\\ and é"',
    ]
    config = load_config(PIPELINES / f"{name}.toml", overrides)
    text = config_toml(config)
    assert "max_image_area = inf" in text  # a default, written out
    assert "# max_faces: unset" in text  # TOML has no null
    again = load_config(_write(tmp_path, text))
    assert again == config
    assert load_config(_write(tmp_path, config_toml(Config()))) == Config()
