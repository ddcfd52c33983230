"""`laionface takedown DATASET --out NEW`: a new version of a dataset without some samples.

People ask for their photos to be removed; LAION withdrew LAION-5B and re-released it with the
links to illegal images removed, and asks holders of old copies to remove the same samples. A
takedown reads a dataset folder alone (never its run folder) and writes a new version to
another folder, leaving the old one untouched. The samples removed are chosen by selectors,
each a reason of contract.TAKEDOWN_REASONS (a sample is counted once, under the first that
applies):

    keep_only  --keep-only FILE   neither its SAMPLE_ID nor its url is in FILE (an allow-list,
                                  e.g. what a cleaned re-release still holds)
    ids        --ids FILE         its SAMPLE_ID is in FILE
    urls       --urls FILE        its url is in FILE (exact bytes, as metadata.exclude_list)
    sha256     --sha256 FILE      the sha256 of its image bytes is in FILE (hex, either case)
    images     --images PATH      its pHash is within --max-distance (default 4) of one of the
                                  images in PATH (folders, tars, images or pHash parquet files,
                                  hashed as the dedup stage's reference is)

FILE is in any layout metadata.exclude_list reads (stages.metadata.idlists.read_list: .pth/.pt,
.npy, .parquet, .txt); it is read once into sorted arrays (8 bytes per ID, 16 per URL or
sha256) that every shard is checked against; with 10M IDs the command peaked at 476 MB from
.npy and 1.2 GB from .txt, its imports included (benchmarks/bench_takedown.py).

The new version (contract.ORDER_RULE's takedown rule): every shard keeps its name; a shard that
lost no sample is copied byte for byte (its checksum checked on the way), a shard that lost some
is rewritten without them (the other samples' members byte for byte, in the same order), and may
end up shorter than samples_per_shard, or empty. Then NNNNN.parquet, sizes.json,
shardindex.json, manifest.parquet (streamed), the dataset card and dataset.json, written last,
with `previous` (the sha256 of the old dataset.json, its date and sample count) and `changes`
(removals per reason, the shards rewritten). Every file is written atomically; a re-run after an
interruption copies again only what is missing. `publish --replace` then swaps it in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.dataset import contract
from laionface.dataset.contract import TAKEDOWN_REASONS
from laionface.dataset.phashmatch import ReferenceHashes
from laionface.dataset.publish import PublishError, place_file, sha256_of
from laionface.dataset.verify import file_sizes
from laionface.dataset.verify_shard import schema_problems
from laionface.engine.lease import holding
from laionface.engine.markers import now_iso
from laionface.engine.runfolder import software_versions
from laionface.io import storage
from laionface.io.tars import HashingReader, HashingWriter, TarWriter, iter_members
from laionface.layout import LEASE_FILE
from laionface.stages.dedup.reference import hash_reference, reference_jobs
from laionface.stages.dedup.samples import hex_to_u64
from laionface.stages.metadata import idlists
from laionface.stages.metadata.idlists import IdList

log = logging.getLogger("laionface")

# The columns of NNNNN.parquet the selectors read.
SELECTED_COLUMNS = ["key", "SAMPLE_ID", "url", "sha256", "phash"]
MANIFEST_BATCH_ROWS = 65_536


class TakedownError(RuntimeError):
    """The takedown can't be made; the message names the file and what to do."""


@dataclass(frozen=True)
class Selectors:
    """What to remove (the CLI's options); empty ones select nothing."""

    ids: str = ""
    urls: str = ""
    sha256: str = ""
    images: tuple[str, ...] = ()
    max_distance: int = 4
    keep_only: str = ""


@dataclass
class ShardPlan:
    """One shard's fate: the keys removed (key -> reason), the samples it had, and how many of
    them have no pHash (--images can't check those)."""

    name: str
    samples: int
    removed: dict[str, str] = field(default_factory=dict)
    without_phash: int = 0


@dataclass
class TakedownResult:
    """What a takedown removed (or, with dry_run, would remove)."""

    previous_sha256: str
    samples_before: int
    samples_after: int
    removed: dict[str, int]  # per reason of a selector given, in TAKEDOWN_REASONS order
    rewritten: list[str]  # shards that lost samples
    listed: dict[str, int]  # entries read per selector (list entries, distinct image hashes)
    unreadable_images: list[str] = field(default_factory=list)
    without_phash: int = 0  # samples --images could not check (no pHash recorded)
    out: str | None = None


# ---------------------------------------------------------------------------------------------
# The selectors


def _ids_in(listed: IdList, column: pa.ChunkedArray) -> np.ndarray:
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    values = pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return listed.contains_ids(values) & valid


def _strings_in(listed: IdList, column: pa.ChunkedArray) -> np.ndarray:
    return idlists.contains_hashes(listed.url_hashes, idlists.url_hashes(column))


def _sha256_in(listed: IdList, column: pa.ChunkedArray) -> np.ndarray:
    # The list's entries are hashed as written: try the dataset's lower-case hex and upper case.
    return _strings_in(listed, column) | _strings_in(listed, pc.utf8_upper(column))


def _read_list(path: str, flag: str, url_column: str) -> IdList:
    try:
        listed = idlists.read_list(path, id_column="SAMPLE_ID", url_column=url_column)
    except idlists.IdListError as exc:
        raise TakedownError(f"{flag}: {exc}") from None
    # The IDs' lookup table is built on first use: build it here, once, rather than in every
    # shard thread at the same time (each would hold its own temporary copies of the IDs).
    listed.contains_ids(np.zeros(1, dtype=np.int64))
    return listed


def _kind_check(listed: IdList, path: str, flag: str, other: str, given_to_other: bool) -> None:
    """--ids takes IDs and --urls URLs; a list holding both is read by both flags only when it
    is given to both (as metadata.exclude_list reads it), never half-applied silently."""
    stray = len(listed.url_hashes) if flag == "--ids" else len(listed.ids)
    if stray and not given_to_other:
        kind = "URLs (or other strings)" if flag == "--ids" else "integer IDs"
        raise TakedownError(
            f"{flag} {path}: the list also holds {stray:,} {kind}, which {flag} does not "
            f"remove: pass it as {other} too ({flag} {path} {other} {path} removes both, as "
            "metadata.exclude_list does)"
        )


def _list_tests(selectors: Selectors) -> tuple[dict[str, Callable], dict[str, int]]:
    """{reason: test(table) -> bool mask of the rows it removes} and entries per list."""
    tests: dict[str, Callable] = {}
    listed: dict[str, int] = {}
    if selectors.keep_only:
        allowed = _read_list(selectors.keep_only, "--keep-only", "url")
        tests["keep_only"] = lambda t: (
            ~(_ids_in(allowed, t["SAMPLE_ID"]) | _strings_in(allowed, t["url"]))
        )
        listed["keep_only"] = len(allowed)
    if selectors.ids:
        ids = _read_list(selectors.ids, "--ids", "url")
        _kind_check(ids, selectors.ids, "--ids", "--urls", selectors.urls == selectors.ids)
        tests["ids"] = lambda t: _ids_in(ids, t["SAMPLE_ID"])
        listed["ids"] = len(ids.ids)
    if selectors.urls:
        urls = _read_list(selectors.urls, "--urls", "url")
        _kind_check(urls, selectors.urls, "--urls", "--ids", selectors.ids == selectors.urls)
        tests["urls"] = lambda t: _strings_in(urls, t["url"])
        listed["urls"] = len(urls.url_hashes)
    if selectors.sha256:
        digests = _read_list(selectors.sha256, "--sha256", "sha256")
        if len(digests.ids):
            raise TakedownError(
                f"--sha256 {selectors.sha256}: {len(digests.ids):,} entries are integers, not "
                "sha256 hex digests (64 hex digits each)"
            )
        tests["sha256"] = lambda t: _sha256_in(digests, t["sha256"])
        listed["sha256"] = len(digests.url_hashes)
    return tests, listed


def reference_hashes(entries: list[str]) -> tuple[np.ndarray, list[str]]:
    """The pHashes of the images `entries` name (as the dedup stage's reference hashes them),
    and the images that could not be read."""
    try:
        jobs = reference_jobs(entries)
    except (FileNotFoundError, ValueError) as exc:
        raise TakedownError(f"--images: {exc}") from None
    parts, unreadable = [], []
    with tempfile.TemporaryDirectory(prefix="laionface-takedown-") as folder:
        for index, job in enumerate(jobs):
            out = posixpath.join(folder, f"ref-{index}.parquet")
            stats = hash_reference(job=job, out_url=out)
            unreadable += stats["examples"]  # a few per job, named with their errors
            parts.append(storage.read_parquet(out, ["phash"]).column("phash").to_numpy())
    values = np.concatenate(parts) if parts else np.empty(0, np.uint64)
    if not len(values):
        raise TakedownError(
            f"--images {' '.join(entries)}: no image could be hashed ({'; '.join(unreadable[:3])})"
        )
    return values.astype(np.uint64), unreadable


def _phashes(column: pa.ChunkedArray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 pHashes with 0 for nulls, validity) of a dataset parquet's phash column."""
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    return hex_to_u64(pc.fill_null(column, "0" * 16), source), valid


# ---------------------------------------------------------------------------------------------
# Planning: every shard's removed keys


@dataclass
class _Selection:
    tests: dict[str, Callable]
    references: ReferenceHashes | None


def _read_verified(url: str, entry: dict | None) -> bytes:
    """A dataset file's bytes, checked against its dataset.json entry."""
    if entry is None:
        raise TakedownError(f"{url}: not listed in dataset.json; run laionface verify on it")
    data = storage.read_bytes(url)
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise TakedownError(
            f"{url}: its size or sha256 differs from dataset.json: the dataset is damaged; run "
            f"laionface verify {url.rsplit('/', 1)[0]}"
        )
    return data


def _shard_table(source_url: str, meta: dict, name: str, columns: list[str] | None) -> pa.Table:
    parquet = contract.parquet_name(name)
    data = _read_verified(storage.join(source_url, parquet), meta["files"].get(parquet))
    try:
        return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns)
    except (pa.ArrowException, KeyError) as exc:
        raise TakedownError(
            f"{source_url}/{parquet}: not the contract's NNNNN.parquet ({exc}); run laionface "
            "verify on the dataset"
        ) from None


def _plan_shard(source_url: str, meta: dict, name: str, selection: _Selection) -> ShardPlan:
    """The keys of shard `name` that go, each with its reason."""
    table = _shard_table(source_url, meta, name, SELECTED_COLUMNS)
    codes = np.zeros(table.num_rows, dtype=np.int8)
    without_phash = 0
    for code, reason in enumerate(TAKEDOWN_REASONS, 1):
        if reason == "images" and selection.references is not None:
            hashes, valid = _phashes(table["phash"], contract.parquet_name(name))
            hit = selection.references.near(hashes) & valid
            without_phash = int((~valid).sum())
        elif reason in selection.tests:
            hit = selection.tests[reason](table)
        else:
            continue
        codes[(codes == 0) & hit] = code
    keys = table["key"].to_pylist()
    removed = {keys[i]: TAKEDOWN_REASONS[codes[i] - 1] for i in np.flatnonzero(codes)}
    return ShardPlan(name, table.num_rows, removed, without_phash)


def _map(fn: Callable, items: list, workers: int) -> list:
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def read_dataset(source: str) -> tuple[str, bytes, dict]:
    """(folder, dataset.json's bytes, its content) of the dataset at `source`, checked against
    the contract's schema."""
    source_url = contract.dataset_folder(source)
    meta_bytes = storage.read_bytes(storage.join(source_url, contract.DATASET_JSON))
    try:
        meta = json.loads(meta_bytes)
    except ValueError as exc:
        raise TakedownError(
            f"{source_url}/{contract.DATASET_JSON}: not valid JSON ({exc})"
        ) from None
    problems = schema_problems(meta, contract.DATASET_JSON_SCHEMA, contract.DATASET_JSON)
    if problems:
        raise TakedownError(
            f"{source_url} is not a dataset this version can take down from:\n  "
            + "\n  ".join(problems[:5])
        )
    return source_url, meta_bytes, meta


def plan_takedown(
    source_url: str, meta: dict, meta_bytes: bytes, selectors: Selectors, workers: int = 4
) -> tuple[list[ShardPlan], TakedownResult]:
    """Every shard's removed keys, and the result they make (nothing is written)."""
    tests, listed = _list_tests(selectors)
    references, unreadable = None, []
    if selectors.images:
        hashes, unreadable = reference_hashes(list(selectors.images))
        references = ReferenceHashes(hashes, selectors.max_distance)
        listed["images"] = len(references)
    if not tests and references is None:
        raise TakedownError(
            "no selector given: pass --ids, --urls, --sha256, --images or --keep-only"
        )
    selection = _Selection(tests, references)
    names = contract.shard_names(meta["counts"]["shards"])
    plans = _map(lambda n: _plan_shard(source_url, meta, n, selection), names, workers)
    removed = {r: 0 for r in TAKEDOWN_REASONS if r in listed}
    for plan in plans:
        for reason in plan.removed.values():
            removed[reason] += 1
    before = meta["counts"]["samples"]
    result = TakedownResult(
        previous_sha256=hashlib.sha256(meta_bytes).hexdigest(),
        samples_before=before,
        samples_after=before - sum(removed.values()),
        removed=removed,
        rewritten=[p.name for p in plans if p.removed],
        listed=listed,
        unreadable_images=unreadable,
        without_phash=sum(p.without_phash for p in plans),
    )
    return plans, result


# ---------------------------------------------------------------------------------------------
# Writing the new version


def _parquet_bytes(table: pa.Table) -> bytes:
    """NNNNN.parquet's bytes, written as emit writes them."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.combine_chunks(), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _rewrite_tar(source_url: str, out: str, meta: dict, plan: ShardPlan, rows: list[dict]):
    """NNNNN.tar without the removed samples, the others' members byte for byte; returns its
    dataset.json entry and the new manifest rows."""
    name = contract.tar_name(plan.name)
    source = storage.join(source_url, name)
    entry = meta["files"].get(name)
    samples: list[tuple[str, dict]] = []
    fs, path = storage.fs_for(source)
    with fs.open(path, "rb") as handle, storage.atomic_open(storage.join(out, name)) as target:
        reader, writer = HashingReader(handle), HashingWriter(target)
        tar = TarWriter(writer)
        for member, data in iter_members(
            reader, source=source, wanted=lambda m: m.key not in plan.removed
        ):
            if member.key in plan.removed:
                continue
            if not samples or samples[-1][0] != member.key:
                samples.append((member.key, {}))
            samples[-1][1][member.ext] = tar.add(member.name, data)
        reader.drain()
        if entry is None or (reader.size, reader.sha256.hexdigest()) != (
            entry["size"],
            entry["sha256"],
        ):
            # Raised inside atomic_open: the partial tar is deleted, never renamed into place.
            raise TakedownError(
                f"{source}: its size or sha256 differs from dataset.json: the dataset is damaged; "
                f"run laionface verify {source_url}"
            )
        tar.close()
    if [key for key, _ in samples] != [row["key"] for row in rows]:
        raise TakedownError(f"{source}: its samples are not those of its parquet; run verify")
    manifest = [
        contract.manifest_row(key, row["SAMPLE_ID"], plan.name, index, name, members)
        for index, ((key, members), row) in enumerate(zip(samples, rows, strict=True))
    ]
    tar_entry = {"sha256": writer.sha256.hexdigest(), "md5": writer.md5.hexdigest()}
    tar_entry["size"] = writer.size
    return tar_entry, manifest


def _copy_shard(source_url: str, out: str, meta: dict, name: str, present: dict) -> dict:
    """An untouched shard's files, copied byte for byte; {file: entry}."""
    files = {}
    for file in (contract.parquet_name(name), contract.tar_name(name)):
        entry = meta["files"].get(file)
        if entry is None:  # a manifest-mode dataset has no tars
            continue
        try:
            place_file(
                storage.join(source_url, file), storage.join(out, file), entry, present.get(file)
            )
        except PublishError as exc:
            raise TakedownError(str(exc)) from None
        files[file] = entry
    return files


def _write_shard(source_url: str, out: str, meta: dict, plan: ShardPlan, present: dict) -> dict:
    """One shard of the new version: {"files", "samples", "manifest" (copy mode, rewritten)}."""
    if not plan.removed:
        files = _copy_shard(source_url, out, meta, plan.name, present)
        return {"files": files, "samples": plan.samples, "manifest": None}
    table = _shard_table(source_url, meta, plan.name, None)
    keep = pc.invert(pc.is_in(table["key"], pa.array(list(plan.removed), pa.string())))
    table = table.filter(keep).cast(contract.DATASET_SHARD)
    parquet = _parquet_bytes(table)
    storage.write_bytes(storage.join(out, contract.parquet_name(plan.name)), parquet)
    files = {contract.parquet_name(plan.name): contract.file_entry(parquet)}
    manifest = None
    if meta["mode"] == "copy":
        rows = table.select(["key", "SAMPLE_ID"]).to_pylist()
        files[contract.tar_name(plan.name)], manifest = _rewrite_tar(
            source_url, out, meta, plan, rows
        )
    return {"files": files, "samples": table.num_rows, "manifest": manifest}


def _runs(table: pa.Table):
    """(shard, rows) of each run of rows of one shard (a manifest's shards are contiguous)."""
    shards = np.asarray(table["shard"].to_pylist(), dtype=object)
    if not len(shards):
        return
    bounds = [0, *(np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist(), len(shards)]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        yield str(shards[start]), table.slice(start, stop - start)


class _ManifestRows:
    """The new manifest's rows in place of the old ones, shard run by shard run."""

    def __init__(self, plans: dict[str, ShardPlan], rewritten: dict[str, list[dict]], mode: str):
        self.plans, self.rewritten, self.mode = plans, rewritten, mode
        self.emitted: set[str] = set()
        self.counters: dict[str, int] = {}

    def replace(self, shard: str, rows: pa.Table) -> pa.Table:
        plan = self.plans.get(shard)
        if plan is None:
            raise TakedownError(
                f"manifest.parquet names shard {shard}, which dataset.json does not have: the "
                "dataset is damaged; run laionface verify on it"
            )
        if not plan.removed:
            return rows
        if self.mode == "copy":  # the rewritten tar's rows, once, where its old rows were
            return self.pending(shard)
        kept = rows.filter(pc.invert(pc.is_in(rows["key"], pa.array(list(plan.removed)))))
        start = self.counters.get(shard, 0)
        self.counters[shard] = start + kept.num_rows
        index = pa.array(np.arange(start, start + kept.num_rows, dtype=np.int32), pa.int32())
        return kept.set_column(kept.schema.get_field_index("index"), "index", index)

    def pending(self, shard: str) -> pa.Table:
        if shard in self.emitted:
            return contract.MANIFEST.empty_table()
        self.emitted.add(shard)
        return pa.Table.from_pylist(self.rewritten[shard], schema=contract.MANIFEST)


def _write_manifest(source_url: str, out: str, meta: dict, rows: _ManifestRows) -> dict:
    """manifest.parquet of the new version, streamed from the old one: {"entry", "tars" (the
    tars its rows point into), "image_exts"}."""
    name = contract.MANIFEST_PARQUET
    source = storage.join(source_url, name)
    entry = meta["files"].get(name)
    if entry is None or sha256_of(source) != entry["sha256"]:
        raise TakedownError(f"{source}: its sha256 differs from dataset.json; run laionface verify")
    tars: set[str] = set()
    exts: set[str] = set()

    def write(writer: pq.ParquetWriter, part: pa.Table) -> None:
        if part.num_rows:
            writer.write_table(part)
            tars.update(pc.unique(part["tar"]).to_pylist())
            exts.update(pc.unique(part["image_ext"]).to_pylist())

    fs, path = storage.fs_for(source)
    with fs.open(path, "rb") as handle, storage.atomic_open(storage.join(out, name)) as target:
        sink = HashingWriter(target)
        with pq.ParquetWriter(sink, contract.MANIFEST, compression="zstd") as writer:
            for batch in pq.ParquetFile(handle).iter_batches(MANIFEST_BATCH_ROWS):
                table = pa.Table.from_batches([batch]).cast(contract.MANIFEST)
                for shard, part in _runs(table):
                    write(writer, rows.replace(shard, part))
            for shard in sorted(set(rows.rewritten) - rows.emitted):  # no old rows at all
                write(writer, rows.pending(shard))
    entry = {"sha256": sink.sha256.hexdigest(), "size": sink.size}
    return {"entry": entry, "tars": tars, "image_exts": exts}


def _write_json(out: str, name: str, obj: Any) -> dict:
    data = contract.json_bytes(obj)
    storage.write_bytes(storage.join(out, name), data)
    return contract.file_entry(data)


def _new_meta(meta: dict, result: TakedownResult, name: str, files: dict, tars: set) -> dict:
    """dataset.json of the new version (without the card's entry)."""
    new = dict(meta)
    new.update(
        name=name,
        created=now_iso(),
        versions=software_versions(),
        order=contract.ORDER_RULE,
        counts={"samples": result.samples_after, "shards": meta["counts"]["shards"]},
        previous={
            "sha256": result.previous_sha256,
            "created": meta["created"],
            "samples": meta["counts"]["samples"],
        },
        changes={"removed": dict(result.removed), "rewritten": list(result.rewritten)},
        files=files,
    )
    if meta["mode"] == "manifest":  # only the raw tars the manifest still points into
        unknown = sorted(tars - set(meta["sources"]))
        if unknown:
            raise TakedownError(
                f"manifest.parquet points into {unknown[0]}, which dataset.json's sources do not "
                "list: the dataset is damaged; run laionface verify on it"
            )
        new["sources"] = {tar: meta["sources"][tar] for tar in sorted(tars)}
    return new


# ---------------------------------------------------------------------------------------------
# The command


def _check_target(source_url: str, out: str) -> None:
    """Refuses the source itself or a folder inside it as the target, and a target holding a
    dataset or files a dataset never has (an interrupted takedown's files are fine)."""
    local = "://" not in source_url and "://" not in out
    a, b = (posixpath.realpath(source_url), posixpath.realpath(out)) if local else (source_url, out)
    if b == a or b.startswith(a.rstrip("/") + "/"):
        raise TakedownError(
            f"--out {out} is the dataset itself or inside it: the old version stays untouched; "
            "write the new one to another folder"
        )
    present = file_sizes(out)
    if contract.DATASET_JSON in present:
        raise TakedownError(
            f"{out} already holds a dataset (dataset.json): write the new version to an empty "
            "folder, then `laionface publish --replace` it over the old one"
        )
    unknown = sorted(
        n
        for n in present
        if not contract.DATASET_FILE.fullmatch(n)
        and n != LEASE_FILE
        and not n.startswith(storage.TEMP_PREFIX)
    )
    if unknown:
        raise TakedownError(
            f"{out} holds files that are not a dataset's ({', '.join(unknown[:5])}): write the "
            "new version to an empty folder"
        )


def _write_version(
    source_url: str,
    out: str,
    meta: dict,
    plans: list[ShardPlan],
    result: TakedownResult,
    name: str,
    workers: int,
    present: dict[str, int],
) -> None:
    """Every file of the new version, dataset.json last."""
    shards = _map(lambda p: _write_shard(source_url, out, meta, p, present), plans, workers)
    files: dict[str, dict] = {}
    samples: dict[str, int] = {}
    rewritten: dict[str, list[dict]] = {}
    for plan, shard in zip(plans, shards, strict=True):
        files.update(shard["files"])
        samples[plan.name] = shard["samples"]
        if shard["manifest"] is not None:
            rewritten[plan.name] = shard["manifest"]
    rows = _ManifestRows({p.name: p for p in plans}, rewritten, meta["mode"])
    manifest = _write_manifest(source_url, out, meta, rows)
    files[contract.MANIFEST_PARQUET] = manifest["entry"]
    if meta["mode"] == "copy":
        files[contract.SIZES_JSON] = _write_json(out, contract.SIZES_JSON, contract.sizes(samples))
        index = contract.shard_index(name, samples, files)
        files[contract.SHARD_INDEX_JSON] = _write_json(out, contract.SHARD_INDEX_JSON, index)
    new = _new_meta(meta, result, name, files, manifest["tars"])
    exts = manifest["image_exts"]
    card = contract.dataset_card(new, next(iter(exts)) if len(exts) == 1 else None).encode()
    storage.write_bytes(storage.join(out, contract.DATASET_CARD), card)
    files[contract.DATASET_CARD] = contract.file_entry(card)
    new["files"] = dict(sorted(files.items()))
    for stray in sorted(set(present) - set(files) - {LEASE_FILE}):  # an interrupted attempt's
        storage.remove(storage.join(out, stray))
    storage.write_bytes(storage.join(out, contract.DATASET_JSON), contract.json_bytes(new))


def takedown(
    source: str,
    out: str | None,
    selectors: Selectors,
    *,
    name: str | None = None,
    workers: int = 4,
    dry_run: bool = False,
    force: bool = False,
) -> TakedownResult:
    """Write to `out` a new version of the dataset at `source` (a dataset or run folder, any
    fsspec URL) without the samples `selectors` choose; returns what was removed.

    `name`: the new version's name (default: the old one's; wids caches shards by it).
    `dry_run`: only count what would go (`out` may be None). Raises TakedownError for a damaged
    source, an unreadable list, a bad target or a takedown that would leave no sample, and
    LeaseHeld when another command writes `out` (`force` takes over a stale lease).
    """
    source_url, meta_bytes, meta = read_dataset(source)
    plans, result = plan_takedown(source_url, meta, meta_bytes, selectors, workers)
    if dry_run:
        return result
    if not out:
        raise TakedownError("--out is required (or --dry-run to count only)")
    if result.samples_after == 0 and result.samples_before:
        log.warning("takedown: the selectors remove every sample: the new version is empty")
    out = out.rstrip("/")
    _check_target(source_url, out)
    with holding(out, "laionface takedown", force):
        present = file_sizes(out)
        _write_version(source_url, out, meta, plans, result, name or meta["name"], workers, present)
    log.info(
        "takedown: %s of %s samples removed, %d shard(s) rewritten; new version at %s",
        f"{result.samples_before - result.samples_after:,}",
        f"{result.samples_before:,}",
        len(result.rewritten),
        out,
    )
    result.out = out
    return result
