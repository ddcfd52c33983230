"""The per-shard checks of `laionface verify` (dataset/verify.py): each reads one dataset shard
(and, in manifest mode, the raw tars it points into) and returns a `ShardSummary`: its problems
and the few figures the checks across shards need (counts, checksums, the first and last sample
in order), never its rows, so verifying a dataset of any size holds per-shard figures only.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from laionface.dataset import contract
from laionface.dataset.contract import DATASET_SHARD, MANIFEST, SAMPLE_JSON_SCHEMA, sample_json
from laionface.io import storage
from laionface.io.tars import HashingReader, UnsafeTar, iter_members, members_of, name_problem

# One shard's problems are cut to this many lines (a broken shard can have thousands).
MAX_PROBLEMS_PER_FILE = 20


@functools.lru_cache(maxsize=8)
def _validator(schema_json: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_json))


@functools.lru_cache(maxsize=8)
def _fast_validator(schema_json: str):
    """The schema compiled to Python (fastjsonschema, ~30x faster than jsonschema on a sample's
    json): it says only whether an object is valid, jsonschema then says every way it is not.
    The schemas checked this way use keywords both implement alike (tests/test_verify.py)."""
    import fastjsonschema

    return fastjsonschema.compile(json.loads(schema_json))


def schema_problems(obj: Any, schema: dict, where: str) -> list[str]:
    """Each way `obj` breaks the JSON Schema, as '{where}: {path}: {message}'."""
    out = []
    errors = _validator(json.dumps(schema, sort_keys=True)).iter_errors(obj)
    for error in sorted(errors, key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        out.append(f"{where}: {path}: {error.message}")
    return out


def sample_json_problems(obj: Any, where: str) -> list[str]:
    """schema_problems against SAMPLE_JSON_SCHEMA, through the fast validator first."""
    import fastjsonschema

    try:
        _fast_validator(_SAMPLE_SCHEMA_JSON)(obj)
    except fastjsonschema.JsonSchemaException:
        return schema_problems(obj, SAMPLE_JSON_SCHEMA, where)
    return []


_SAMPLE_SCHEMA_JSON = json.dumps(SAMPLE_JSON_SCHEMA, sort_keys=True)


def image_problem(data: bytes, max_pixels: int) -> str | None:
    """Why the image bytes don't decode (or are too large to), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return f"{width}x{height} pixels, over the {max_pixels:,} pixel cap"
                image.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "broken"
        return f"does not decode ({type(exc).__name__}: {exc})"
    return None


class Problems(list):
    """Problem lines of one file, cut after MAX_PROBLEMS_PER_FILE."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.dropped = 0

    def add(self, text: str, prefix: bool = True) -> None:
        if len(self) < MAX_PROBLEMS_PER_FILE:
            self.append(f"{self.where}: {text}" if prefix else text)
        else:
            self.dropped += 1

    def lines(self) -> list[str]:
        tail = [f"{self.where}: ... and {self.dropped} more problems"] if self.dropped else []
        return list(self) + tail


@dataclass
class ShardSummary:
    """What a shard's check tells the checks across shards."""

    problems: list[str] = field(default_factory=list)
    samples: int = 0  # samples in its tar (copy mode) or rows in its parquet (manifest mode)
    tar: dict[str, Any] = field(default_factory=dict)  # md5, sha256, size of the tar read
    first: tuple[str, str] | None = None  # (raw_shard, key) of its first parquet row
    last: tuple[str, str] | None = None  # and of its last
    sizes: list[int] = field(default_factory=list)  # each sample's bytes in the tar, in order
    manifest_rows: int = 0  # manifest.parquet's rows for this shard
    sources: list[str] = field(default_factory=list)  # manifest mode: raw tars it points into
    parquet_read: bool = False  # whether NNNNN.parquet could be read


def read_checked(url: str, entry: dict | None, problems: Problems) -> bytes | None:
    """The file's bytes, checking size and sha256 against dataset.json's entry."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return None
    if entry is not None:
        if len(data) != entry["size"]:
            problems.add(f"size {len(data):,} bytes, dataset.json says {entry['size']:,}")
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.add("sha256 differs from dataset.json (the file is corrupt or was changed)")
    return data


def _read_shard_parquet(url: str, entry: dict | None, problems: Problems) -> list[dict] | None:
    data = read_checked(url, entry, problems)
    if data is None:
        return None
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except Exception as exc:  # pyarrow raises several types for a broken file
        problems.add(f"not a readable parquet file ({exc})")
        return None
    if not table.schema.equals(DATASET_SHARD):
        problems.add(f"schema differs from manifests/dataset_shard.arrow.json: {table.schema}")
        return None
    rows = table.to_pylist()
    for index, row in enumerate(rows):
        problem = _count_problem(row)
        if problem:
            problems.add(f"row {index} (key {row['key']}): {problem}")
    return rows


def _count_problem(sample: dict) -> str | None:
    """Why a sample's n_faces is not the number of its counted faces, or None."""
    counted = sum(bool(face.get("counted")) for face in sample["faces"] or [])
    if sample["n_faces"] != counted:
        return f"n_faces is {sample['n_faces']} but {counted} of its faces are counted"
    return None


def _sample_checks(
    key: str, members: dict, problems: Problems, check_images: bool, max_pixels: int
) -> dict | None:
    """Checks one copy-mode sample's members; returns its parsed json (or None)."""
    images = [ext for ext in members if contract.is_image_ext(ext)]
    missing = [ext for ext in ("json", "txt") if ext not in members]
    if not images:
        missing.insert(0, "jpg")
    if missing:
        problems.add(f"key {key}: no {', '.join('.' + m for m in missing)} member")
    if len(images) > 1:
        problems.add(f"key {key}: several image members ({', '.join(images)})")
    parsed = None
    if "json" in members:
        try:
            parsed = json.loads(members["json"][1])
        except ValueError as exc:
            problems.add(f"{key}.json: not valid JSON ({exc})")
        else:
            schema_lines = sample_json_problems(parsed, f"{key}.json")
            for line in schema_lines:
                problems.add(line)
            if isinstance(parsed, dict) and parsed.get("key") != key:
                problems.add(f"{key}.json: key field is {parsed.get('key')!r}")
            if not schema_lines and _count_problem(parsed):
                problems.add(f"{key}.json: {_count_problem(parsed)}")
    if images:
        data = members[images[0]][1]
        if check_images:
            problem = image_problem(data, max_pixels)
            if problem:
                problems.add(f"{key}.{images[0]}: {problem}")
        if isinstance(parsed, dict) and hashlib.sha256(data).hexdigest() != parsed.get("sha256"):
            problems.add(f"{key}.{images[0]}: sha256 differs from the one in {key}.json")
    if "txt" in members and isinstance(parsed, dict):
        if members["txt"][1].decode("utf-8", "replace") != parsed.get("caption"):
            problems.add(f"{key}.txt: differs from the caption in {key}.json")
    return parsed if isinstance(parsed, dict) else None


def _location(key: str, shard: str, index: int, tar: str, members: dict) -> dict:
    """The manifest fields the members ({ext: (member, data)}) of one sample imply."""
    located = {ext: member for ext, (member, _) in members.items()}
    return {
        "key": key,
        "shard": shard,
        "index": index,
        "tar": tar,
        **contract.member_locations(located),
    }


@dataclass
class _TarRead:
    """A copy-mode tar read once: its samples (key, members without bytes, parsed json)."""

    samples: list[tuple[str, dict, dict | None]] = field(default_factory=list)
    entry: dict[str, Any] = field(default_factory=dict)  # md5, sha256, size of the bytes read


def _read_copy_tar(
    handle: Any, tar_name: str, problems: Problems, check_images: bool, max_pixels: int
) -> _TarRead:
    """Read a dataset tar member by member, checking each sample as it completes."""
    read = _TarRead()
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, tuple] = {}

    def finish() -> None:
        if current is not None:
            parsed = _sample_checks(current, members, problems, check_images, max_pixels)
            # Keep where the members are, not their bytes: a shard can hold gigabytes.
            read.samples.append((current, {e: (m, None) for e, (m, _) in members.items()}, parsed))

    reader = HashingReader(handle)
    try:
        for member, data in iter_members(reader, source=tar_name):
            bad_name = name_problem(member.name)
            if bad_name:
                problems.add(bad_name)
                continue
            if member.key != current:
                finish()
                if member.key in seen:
                    problems.add(f"key {member.key}: its members are not adjacent")
                current, members = member.key, {}
                seen.add(member.key)
            if member.ext in members:
                problems.add(f"key {member.key}: two .{member.ext} members")
                continue
            members[member.ext] = (member, data)
        finish()
        reader.drain()
    except UnsafeTar as exc:
        problems.add(f"{exc}; stopped reading this tar", prefix=False)
    read.entry = {"md5": reader.md5.hexdigest(), "sha256": reader.sha256.hexdigest()}
    read.entry["size"] = reader.size
    return read


def _entry_problems(actual: dict, entry: dict | None, problems: Problems) -> None:
    """A file read against its dataset.json entry."""
    if entry is None:
        return
    if actual["size"] != entry["size"]:
        problems.add(f"size {actual['size']:,} bytes, dataset.json says {entry['size']:,}")
    elif actual["sha256"] != entry["sha256"]:
        problems.add("sha256 differs from dataset.json (the file is corrupt or changed)")


def _compare_rows(rows: list[dict], samples: list, tar_name: str, problems: Problems) -> None:
    """NNNNN.parquet's rows against the tar's samples, in order and field by field."""
    if len(rows) != len(samples):
        problems.add(f"{len(rows)} rows but {tar_name} has {len(samples)} samples")
    for index, (row, (key, _, parsed)) in enumerate(zip(rows, samples, strict=False)):
        if row["key"] != key:
            problems.add(
                f"row {index} is key {row['key']} but sample {index} of {tar_name} is {key}"
            )
            return
        if parsed is not None and sample_json(row) != parsed:
            differ = sorted(k for k, v in sample_json(row).items() if parsed.get(k) != v)
            problems.add(
                f"row {index} (key {key}) differs from {key}.json in "
                f"{', '.join(differ) or 'extra fields'}"
            )


def _order_problems(pairs: list[tuple[str, str]], where: str) -> list[str]:
    """The order rule within one shard: (raw_shard, key) strictly increasing, row by row."""
    for position in range(1, len(pairs)):
        before, pair = pairs[position - 1], pairs[position]
        if pair[1] == before[1]:
            return [f"{where}: key {pair[1]} appears twice; keys must be unique in the dataset"]
        if pair <= before:
            return [
                f"{where}: row {position} (key {pair[1]}, raw shard {pair[0]}) comes after key "
                f"{before[1]} (raw shard {before[0]}): the order rule sorts samples by raw "
                "shard, then key"
            ]
    return []


def _summarize_rows(summary: ShardSummary, rows: list[dict], where: str) -> None:
    pairs = [(row["raw_shard"], row["key"]) for row in rows]
    if pairs:
        summary.first, summary.last = pairs[0], pairs[-1]
    summary.problems += _order_problems(pairs, where)


def _pair(sample: tuple[str, dict, dict | None]) -> tuple[str, str]:
    """(raw_shard, key) of a tar's sample, the raw shard from its json."""
    key, _, parsed = sample
    return (str((parsed or {}).get("raw_shard", "")), key)


def shard_keys(dataset_url: str, name: str, mode: str) -> set[str]:
    """Every key of dataset shard `name`: its tar's (copy mode) or its parquet's."""
    if mode == "manifest":
        url = storage.join(dataset_url, contract.parquet_name(name))
        return set(storage.read_parquet(url, columns=["key"])["key"].to_pylist())
    url = storage.join(dataset_url, contract.tar_name(name))
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as handle:
        return {m.key for m, _ in iter_members(handle, source=url, wanted=lambda m: False)}


def manifest_rows(dataset_url: str, shard: str) -> list[dict] | None:
    """manifest.parquet's rows for dataset shard `shard`, in file order (None without a
    readable manifest): only the row groups whose statistics can hold it are read (emit and
    takedown write a shard's rows together)."""
    url = storage.join(dataset_url, contract.MANIFEST_PARQUET)
    fs, path = storage.fs_for(url)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if not parquet.schema_arrow.equals(MANIFEST):
                return None
            column = parquet.schema_arrow.get_field_index("shard")
            groups = []
            for index in range(parquet.num_row_groups):
                stats = parquet.metadata.row_group(index).column(column).statistics
                if stats is None or not stats.has_min_max or stats.min <= shard <= stats.max:
                    groups.append(index)
            table = parquet.read_row_groups(groups)
    except Exception:  # missing or broken: the checks of the whole file say so
        return None
    return table.filter(pc.equal(table["shard"], shard)).to_pylist()


def _manifest_problems(rows: list[dict] | None, locations: dict[str, dict]) -> list[str]:
    """Copy mode: a shard's manifest rows against the locations its tar gave."""
    if rows is None:
        return []
    problems = Problems(contract.MANIFEST_PARQUET)
    seen = set()
    for row in rows:
        key = row["key"]
        seen.add(key)
        actual = locations.get(key)
        if actual is None:
            problems.add(f"key {key}: no such sample in {row['tar']}")
            continue
        differ = sorted(k for k, v in actual.items() if row.get(k) != v)
        if differ:
            problems.add(f"key {key}: {', '.join(differ)} do not match its tar")
    for key in sorted(set(locations) - seen):
        problems.add(f"key {key}: missing (it is in {locations[key]['tar']})")
    return problems.lines()


def check_copy_shard(
    dataset_url: str, name: str, files: dict, check_images: bool, max_pixels: int, sizes: bool
) -> ShardSummary:
    """Copy mode: NNNNN.tar and NNNNN.parquet against each other, dataset.json's entries, the
    sample rules and manifest.parquet's rows for the shard; with `sizes`, each sample's bytes
    in the tar (for the order rule's cut by max_shard_bytes)."""
    summary = ShardSummary()
    tar_name, parquet_name = contract.tar_name(name), contract.parquet_name(name)
    parquet_problems = Problems(parquet_name)
    rows = _read_shard_parquet(
        storage.join(dataset_url, parquet_name), files.get(parquet_name), parquet_problems
    )
    problems = Problems(tar_name)
    fs, path = storage.fs_for(storage.join(dataset_url, tar_name))
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        summary.problems = problems.lines() + parquet_problems.lines()
        return summary
    with handle:
        read = _read_copy_tar(handle, tar_name, problems, check_images, max_pixels)
    summary.tar = read.entry
    _entry_problems(read.entry, files.get(tar_name), problems)
    summary.samples = len(read.samples)
    locations = {
        key: _location(key, name, index, tar_name, members)
        for index, (key, members, _) in enumerate(read.samples)
    }
    if sizes:
        summary.sizes = [locations[key]["sample_size"] for key, _, _ in read.samples]
    if rows is not None:
        _compare_rows(rows, read.samples, tar_name, parquet_problems)
        _summarize_rows(summary, rows, parquet_name)
    if read.samples:  # where the tar's samples start and end, checked across shards
        summary.first, summary.last = (_pair(read.samples[0]), _pair(read.samples[-1]))
    summary.problems = problems.lines() + parquet_problems.lines() + summary.problems
    found = manifest_rows(dataset_url, name)
    summary.manifest_rows = len(found or [])
    summary.problems += _manifest_problems(found, locations)
    return summary


def _check_raw_tar(
    root: str, tar: str, entry: dict | None, rows: list[dict], check_images: bool, max_pixels: int
) -> tuple[list[str], dict[str, str]]:
    """Manifest mode: the raw tar `tar` holds each row's members where the manifest says;
    returns the problems and the sha256 of each row's image."""
    problems = Problems(tar)
    wanted = {row["key"]: row for row in rows}
    found: dict[str, dict] = {}
    digests: dict[str, str] = {}
    url = storage.join(root, tar)
    fs, path = storage.fs_for(url)
    if not fs.exists(path):
        problems.add(f"missing under {root} (manifest mode reads the images from the raw tars)")
        return problems.lines(), digests
    with fs.open(path, "rb") as handle:
        reader = HashingReader(handle)
        try:
            for member, data in members_of(
                reader, set(wanted), source=tar, read=lambda m: contract.is_image_ext(m.ext)
            ):
                found.setdefault(member.key, {})[member.ext] = (member, None)
                if data is not None:  # the image: checked now, its bytes not kept
                    digests[member.key] = hashlib.sha256(data).hexdigest()
                    problem = image_problem(data, max_pixels) if check_images else None
                    if problem:
                        problems.add(f"{member.name}: {problem}")
            reader.drain()
        except UnsafeTar as exc:
            problems.add(f"{exc}; stopped reading this tar", prefix=False)
    if entry is None:
        problems.add("not listed in dataset.json's sources")
    elif reader.size != entry["size"] or reader.sha256.hexdigest() != entry["sha256"]:
        problems.add("sha256 or size differs from dataset.json's sources (the raw tar changed)")
    for key, row in wanted.items():
        members = found.get(key)
        if not members:
            problems.add(f"key {key}: no members")
            continue
        actual = _location(key, row["shard"], row["index"], tar, members)
        differ = sorted(k for k, v in actual.items() if row.get(k) != v)
        if differ:
            problems.add(f"key {key}: manifest.parquet's {', '.join(differ)} do not match the tar")
    return problems.lines(), digests


def check_manifest_shard(
    dataset_url: str, name: str, meta: dict, root: str, check_images: bool, max_pixels: int
) -> ShardSummary:
    """Manifest mode: NNNNN.parquet, manifest.parquet's rows for the shard (the same keys in the
    same order), and the raw tars they point into (members where the manifest says, images
    decoding to the sha256 the parquet records, the tars' checksums against `sources`)."""
    summary = ShardSummary()
    parquet = contract.parquet_name(name)
    problems = Problems(parquet)
    rows = _read_shard_parquet(
        storage.join(dataset_url, parquet), meta["files"].get(parquet), problems
    )
    summary.problems = problems.lines()
    if rows is None:
        return summary
    summary.samples, summary.parquet_read = len(rows), True
    _summarize_rows(summary, rows, parquet)
    located = manifest_rows(dataset_url, name) or []
    summary.manifest_rows = len(located)
    if [r["key"] for r in rows] != [r["key"] for r in located]:
        summary.problems.append(
            f"{parquet}: its keys differ from manifest.parquet's rows for shard {name}"
        )
    by_tar: dict[str, list[dict]] = {}
    for row in located:
        by_tar.setdefault(row["tar"], []).append(row)
    summary.sources = sorted(by_tar)
    digests: dict[str, str] = {}
    for tar, tar_rows in sorted(by_tar.items()):
        tar_problems, found = _check_raw_tar(
            root, tar, meta["sources"].get(tar), tar_rows, check_images, max_pixels
        )
        summary.problems += tar_problems
        digests.update(found)
    for row in rows:
        actual = digests.get(row["key"])
        if actual is not None and actual != row["sha256"]:
            summary.problems.append(f"{parquet}: key {row['key']}: sha256 differs from the image")
    return summary
