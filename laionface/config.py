"""The one typed config of a laionface pipeline, loaded from `pipelines/*.toml`.

Every section is a pydantic model that forbids unknown keys, so a typo is an error that names the
file and the key instead of a silently ignored setting. `--set section.key=value` overrides are
applied to the raw TOML before validation, so they are checked exactly like the file itself.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A pipeline config that can't be used; the message names the file, the key and the fix."""


class Section(BaseModel):
    # inf (no limit) is written as "Infinity", so a saved config validates again.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="strings")


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class RunSection(Section):
    name: str = "laionface"
    # Where the run folder goes when `--run-dir` is not given: any fsspec URL.
    run_dir: str = "runs/{name}"
    seed: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class ClusterSection(Section):
    # Address of an existing Dask scheduler (tcp://host:8786); empty starts a LocalCluster.
    scheduler: str = ""
    workers: PositiveInt = 2
    threads_per_worker: PositiveInt = 1
    memory_limit: str = "auto"
    # How many times a failing shard is retried before it is recorded as failed.
    retries: NonNegativeInt = 2
    # A shard still running after this many seconds has its worker restarted and is retried
    # (a task wedged in C, a stopped process): no run waits forever. 0 = never. Steps that know
    # a shard's worst case (download's shard_deadline) use theirs.
    task_timeout: Annotated[float, Field(ge=0)] = 3600.0
    # Dashboard address for a LocalCluster (":0" picks a free port, "" disables it).
    dashboard_address: str = ":0"


class MetadataColumns(Section):
    # Input column names; "" marks a column the input lacks (its output column is null), allowed
    # for every column but url and text, and only when no filter reads it.
    sample_id: str = "SAMPLE_ID"
    url: str = "URL"
    text: str = "TEXT"
    height: str = "HEIGHT"
    width: str = "WIDTH"
    license: str = "LICENSE"
    nsfw: str = "NSFW"
    similarity: str = "similarity"
    # Read only by the max_punsafe / max_pwatermark filters (not carried to the download
    # shards): LAION-5B's safety and watermark probabilities, or a source's equivalents.
    punsafe: str = ""
    pwatermark: str = ""


class MetadataSection(Section):
    # Parquet inputs: paths, globs, folders or fsspec URLs.
    input: list[str] = Field(default_factory=list)
    columns: MetadataColumns = Field(default_factory=MetadataColumns)
    id_list: str = ""
    exclude_list: str = ""
    nsfw: list[str] = Field(default_factory=list)
    # Allowed LICENSE values, exactly as written ("?" is LAION's unknown); [] = all.
    licenses: list[str] = Field(default_factory=list)
    max_punsafe: Fraction | None = None
    max_pwatermark: Fraction | None = None
    min_similarity: float | None = None
    min_side: NonNegativeInt | None = None
    max_side: PositiveInt | None = None
    max_aspect_ratio: Annotated[float, Field(ge=1.0)] | None = None
    min_caption_chars: NonNegativeInt | None = None
    max_caption_chars: PositiveInt | None = None
    url_schemes: list[str] = Field(default_factory=lambda: ["http", "https"])
    blocked_domains: list[str] = Field(default_factory=list)
    dedup_urls: bool = True
    rows_per_shard: PositiveInt = 10_000

    @field_validator("input", "nsfw", "licenses", "url_schemes", "blocked_domains", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("url_schemes")
    @classmethod
    def _bare_schemes(cls, value: list[str]) -> list[str]:
        return [s.strip().lower().removesuffix("://").removesuffix(":") for s in value]

    @field_validator("blocked_domains")
    @classmethod
    def _bare_domains(cls, value: list[str]) -> list[str]:
        return [d.strip().lower().removeprefix("*").strip(".") for d in value]

    @model_validator(mode="after")
    def _filters_have_columns(self) -> MetadataSection:
        sized = (self.min_side, self.max_side, self.max_aspect_ratio) != (None, None, None)
        needed = {
            "url": True,
            "text": True,
            "nsfw": bool(self.nsfw),
            "license": bool(self.licenses),
            "punsafe": self.max_punsafe is not None,
            "pwatermark": self.max_pwatermark is not None,
            "similarity": self.min_similarity is not None,
            "width": sized,
            "height": sized,
        }
        empty = [
            f"columns.{k}" for k, need in needed.items() if need and not getattr(self.columns, k)
        ]
        if empty:
            raise ValueError(f"{', '.join(empty)} can't be empty: the output or a filter reads it")
        for low, high in (("min_side", "max_side"), ("min_caption_chars", "max_caption_chars")):
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value is not None and high_value is not None and low_value > high_value:
                raise ValueError(f"{low} ({low_value}) is above {high} ({high_value})")
        return self


class DownloadSection(Section):
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "no"
    image_size: PositiveInt = 256
    resize_only_if_bigger: bool = False
    encode_quality: Annotated[int, Field(ge=0, le=100)] = 95
    timeout: Annotated[float, Field(gt=0)] = 10.0
    retries: NonNegativeInt = 0
    thread_count: PositiveInt = 32
    min_image_size: NonNegativeInt = 0
    max_image_area: Annotated[float, Field(gt=0)] = math.inf
    max_aspect_ratio: Annotated[float, Field(gt=0)] = math.inf
    user_agent_token: str = "laionface"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    save_additional_columns: list[str] = Field(
        default_factory=lambda: ["SAMPLE_ID", "NSFW", "similarity", "LICENSE"]
    )
    # Refuse hosts that resolve to private/loopback/link-local/reserved addresses unless allowed.
    allow_loopback: bool = False
    # Like curl --resolve: {"host" = "127.0.0.1:8080"}; the demo maps its fixed host this way.
    resolve: dict[str, str] = Field(default_factory=dict)
    max_bytes: PositiveInt = 50_000_000
    # A response body still arriving this many seconds after its request began is abandoned as a
    # timeout (the socket timeout applies per read, so a trickling server could hold a thread).
    # 0 = 3 x timeout.
    request_deadline: Annotated[float, Field(ge=0)] = 0.0
    # A shard not finished after this many seconds fails (and is retried), so nothing can hang a
    # run. 0 = derived from the shard's rows, thread_count, retries and the request deadline.
    shard_deadline: Annotated[float, Field(ge=0)] = 0.0
    # Warn when a shard's failure rate passes this fraction.
    failure_rate_warning: Fraction = 0.5
    # Requests in flight to one host at once, across the download threads of a worker process
    # (its shards' threads together: never more than this per host from one process).
    max_per_host: PositiveInt = 8
    # Answers 429 / 503 are retried this many times, after the Retry-After delay they ask for
    # (at most max_retry_after seconds; longer asks fail as rate_limited at once).
    rate_limit_retries: NonNegativeInt = 2
    max_retry_after: Annotated[float, Field(ge=0)] = 60.0
    # Images with more pixels than this (by their header) fail as too_many_pixels before any
    # full decode: img2dataset's resizer would decode them whole.
    max_image_pixels: PositiveInt = 50_000_000


class FacesSection(Section):
    weights: str = ""
    network: Literal["mobilenet0.25", "resnet50"] = "mobilenet0.25"
    max_size: Annotated[int, Field(ge=32, le=4096)] = 640
    batch_size: PositiveInt = 16
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["auto", "torch", "onnx"] = "auto"
    record_threshold: Fraction = 0.5
    nms_threshold: Fraction = 0.4
    # Images with more pixels than this are refused before a full decode (no out-of-memory).
    max_image_pixels: PositiveInt = 50_000_000
    # Dask resources each faces task asks the scheduler for, e.g. {GPU = 1}; unset: {GPU = 1}
    # when device is "cuda", none otherwise. Workers offer them with `--resources GPU=1`.
    resources: dict[str, float] | None = None

    def task_resources(self) -> dict[str, float] | None:
        if self.resources is not None:
            return self.resources or None
        return {"GPU": 1} if self.device == "cuda" else None


class SelectSection(Section):
    min_score: Fraction = 0.9
    min_faces: NonNegativeInt = 1
    max_faces: NonNegativeInt | None = None
    min_face_size: NonNegativeInt = 64
    min_face_fraction: Fraction = 0.0
    min_image_side: NonNegativeInt = 0


class DedupSection(Section):
    exact: bool = True  # equal sha256 are duplicates
    near: bool = True  # pHashes within max_distance are duplicates
    max_distance: Annotated[int, Field(ge=0, le=16)] = 4
    # Evaluation sets / earlier datasets to stay disjoint from: folders of images, webdataset
    # tars, parquet files of hashes (`phash` + `item`, see dedup.build_reference), manifests.
    reference: list[str] = Field(default_factory=list)
    # Where the near-duplicate search runs: "memory" on the driver, "dask" across the workers,
    # "auto" memory up to 10M distinct hashes (about 3 GB). Both give the same decisions.
    backend: Literal["auto", "memory", "dask"] = "auto"

    @field_validator("reference", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def enabled(self) -> bool:
        """False when every dedup setting is off: emit then publishes select's output."""
        return self.exact or self.near or bool(self.reference)


class EmitSection(Section):
    samples_per_shard: PositiveInt = 10_000
    # Cut a shard before its tar passes this many bytes (as well as at samples_per_shard; a
    # sample bigger than that gets a tar of its own); unset: by count only. Copy mode only.
    max_shard_bytes: PositiveInt | None = None
    mode: Literal["copy", "manifest"] = "copy"

    @model_validator(mode="after")
    def _size_cut_needs_tars(self) -> EmitSection:
        if self.max_shard_bytes is not None and self.mode == "manifest":
            raise ValueError(
                "emit.max_shard_bytes cuts the tars copy mode writes; manifest mode writes none: "
                'unset it, or use emit.mode = "copy"'
            )
        return self


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    metadata: MetadataSection = Field(default_factory=MetadataSection)
    download: DownloadSection = Field(default_factory=DownloadSection)
    faces: FacesSection = Field(default_factory=FacesSection)
    select: SelectSection = Field(default_factory=SelectSection)
    dedup: DedupSection = Field(default_factory=DedupSection)
    emit: EmitSection = Field(default_factory=EmitSection)

    def resolved(self) -> dict[str, Any]:
        """The config as plain JSON-able data (inf becomes the string "Infinity")."""
        return json.loads(self.model_dump_json())


# A string given without TOML quotes: one word of the characters names, paths, globs and URLs
# use (run.name=my-run, metadata.input=data/*.parquet, cluster.scheduler=tcp://10.0.0.5:8786).
# Quotes, brackets, braces, commas, "=", "#" and spaces are TOML's: a value holding any of them
# must be valid TOML, so an unbalanced bracket is an error instead of a string.
BARE_WORD = re.compile(r"""[^\s"'\[\]{},=#]+""")
# `--set KEY=none` unsets an optional key (one whose type allows None, e.g. select.max_faces).
NONE_WORD = "none"


def _parse_value(key: str, raw: str) -> Any:
    """A `--set` value: TOML, a bare word (a string), or None for `none`."""
    if raw == NONE_WORD:
        return None
    if not raw:
        raise ConfigError(
            f"--set {key}=: no value; give one ('' is the empty string, none unsets an "
            "optional key)"
        )
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError as exc:
        if BARE_WORD.fullmatch(raw):
            return raw  # a bare word is a string: --set run.name=my-run
        raise ConfigError(
            f"--set {key}={raw}: not a TOML value ({exc}) nor a bare word: check its brackets "
            """and quotes, e.g. --set 'metadata.nsfw=["UNLIKELY"]', --set 'run.name="my run"'"""
        ) from None
    if list(parsed) != ["v"]:  # a newline in the value smuggled in more keys
        raise ConfigError(f"--set {key}={raw!r}: one value only, on one line")
    return parsed["v"]


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(
            f"--set {text!r}: expected KEY=VALUE, for example --set faces.batch_size=64"
        )
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: the key is empty")
    return path, _parse_value(".".join(path), raw.strip())


def _field_of(path: list[str]) -> FieldInfo | None:
    """The config field at `path` (["select", "max_faces"]); None when it is no model field."""
    model: type[BaseModel] = Config
    field = None
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return None
        if i < len(path) - 1:
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                return None
            model = field.annotation
    return field


def _check_unset(path: list[str]) -> None:
    """`KEY=none` is for optional keys; for any other it is an error that says what to give."""
    field = _field_of(path)
    if field is None or type(None) in get_args(field.annotation):
        return  # optional, or not a key of the config (validation names it)
    key = ".".join(path)
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        raise ConfigError(f"--set {key}=none: [{key}] is a section; set its keys")
    raise ConfigError(
        f"--set {key}=none: {key} is not optional, so it can't be unset (none unsets optional "
        f"keys such as select.max_faces); give a value (its default is {default!r}), or write "
        f"""--set '{key}="none"' for the string none"""
    )


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `--set KEY=VALUE` overrides to raw config data (before validation); a value is TOML
    or a bare word, `none` unsets an optional key; anything else is a ConfigError naming the key."""
    for text in overrides:
        path, value = _parse_override(text)
        if value is None:
            _check_unset(path)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _describe(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in error["loc"][:-1])
        allowed = _allowed_keys(error["loc"][:-1])
        where = f"section [{section}]" if section else "the top level"
        return f"{source}: unknown key {key!r} in {where}; allowed keys: {', '.join(allowed)}"
    got = error.get("input")
    return f"{source}: {key}: {error['msg']} (got {got!r})"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, source) for err in exc.errors()]
        raise ConfigError("invalid pipeline config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a pipeline TOML, apply `--set` overrides, validate; errors name file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline config not found") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    source = str(path) if not overrides else f"{path} (with --set overrides)"
    return parse_config(apply_overrides(data, overrides), source)


# ---------------------------------------------------------------------------------------------
# The resolved config as TOML (`laionface config`)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's (\n \t \" \\ \uXXXX); DEL is the one control character JSON
    # leaves raw and TOML refuses.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_table(name: str, section: BaseModel) -> list[str]:
    """`[name]` with its keys in declaration order, then its sub-sections as tables."""
    lines, tables = [f"[{name}]"], []
    for key in type(section).model_fields:
        value = getattr(section, key)
        if isinstance(value, BaseModel):
            tables.append((f"{name}.{key}", value))
        elif value is None:
            lines.append(f"# {key}: unset (TOML has no null; --set {name}.{key}={NONE_WORD})")
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for sub_name, sub in tables:
        lines += ["", *_toml_table(sub_name, sub)]
    return lines


def config_toml(config: Config) -> str:
    """The config as TOML: every key with its value, defaults included; an unset optional key is
    a comment (TOML has no null, and a missing optional key loads as unset). `load_config` reads
    it back as an equal config."""
    lines: list[str] = []
    for name in Config.model_fields:
        lines += [*_toml_table(name, getattr(config, name)), ""]
    return "\n".join(lines)
