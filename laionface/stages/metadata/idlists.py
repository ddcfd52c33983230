"""ID and URL lists for the metadata stage: `metadata.id_list` (keep) and `metadata.exclude_list`.

A list holds SAMPLE_IDs, URLs, or both; a row matches when its SAMPLE_ID is among the IDs or its
URL among the URLs. The layouts read (the error for any other names them all):

- `.pth` / `.pt`: `torch.load(weights_only=True)` of an integer tensor, a list/tuple/set of ints
  or of URL strings, or LAION-Face's `laion_face_ids.pth`: a list of 32 collections (one per
  LAION-400M part) of int SAMPLE_IDs, each a list, tuple, set, integer tensor or integer numpy
  array. The collections are merged, so an ID selects its row in whichever part holds it.
- `.npy`: an integer array (IDs) or a string array (URLs); never unpickled.
- `.parquet`: a column named like the sample-id or URL column, or a single integer or string column.
- `.txt`: one SAMPLE_ID or URL per line; blank lines and lines starting with `#` are skipped.

The driver reads a list once and saves it in the run folder as sorted numpy arrays (int64 IDs and
128-bit blake2b hashes of the URLs); workers load those (memory-mapped when local, so the worker
processes of one machine share the pages) and keep them per process. Membership is a binary
search (`np.searchsorted`), so 50M IDs cost 400 MB once instead of the 2+ GB of a Python set.

URLs are compared by the 128-bit hash of their exact bytes (no normalisation): two different URLs
share a hash with probability about n^2 / 2^129, which is nil at any size a web crawl reaches.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from fsspec.implementations.local import LocalFileSystem

from laionface.config import ConfigError
from laionface.io import storage

LAYOUTS = (
    ".pth/.pt (torch.save'd integer tensor, list/tuple/set of ints or URL strings, or "
    "LAION-Face's laion_face_ids.pth: a list of per-part collections of int SAMPLE_IDs), "
    ".npy (integer or string array), "
    ".parquet (a SAMPLE_ID or URL column, or a single column), "
    ".txt (one SAMPLE_ID or URL per line)"
)

EMPTY_IDS = np.empty(0, dtype=np.int64)
EMPTY_HASHES = np.empty((0, 2), dtype=np.uint64)


class IdListError(ConfigError):
    """An ID or URL list that can't be read; the message names the file and the layouts read."""


@dataclass
class IdList:
    """Sorted unique SAMPLE_IDs and sorted unique 128-bit URL hashes (rows of two uint64)."""

    ids: np.ndarray
    url_hashes: np.ndarray

    def __post_init__(self) -> None:
        self._bitmap: np.ndarray | None = None
        self._bitmap_bits = 0

    def __len__(self) -> int:
        return len(self.ids) + len(self.url_hashes)

    def contains_ids(self, values: np.ndarray) -> np.ndarray:
        """Whether each int64 value is one of the IDs.

        A bitmap of ~16 bits per ID (one bit per multiplicative hash) answers "no" for most
        values with one memory access; only the rest (the members and ~6% of the others) pay for
        the binary search, which alone costs ~log2(len) cache misses per value.
        """
        if len(self.ids) == 0 or len(values) == 0:
            return np.zeros(len(values), dtype=bool)
        if self._bitmap is None:
            self._bitmap_bits = int(min(32, max(10, math.ceil(math.log2(len(self.ids) * 16)))))
            bitmap = np.zeros(1 << (self._bitmap_bits - 3), dtype=np.uint8)
            slots = _slots(np.asarray(self.ids), self._bitmap_bits)
            np.bitwise_or.at(bitmap, slots >> np.uint64(3), _bit(slots))
            self._bitmap = bitmap
        slots = _slots(values, self._bitmap_bits)
        maybe = np.flatnonzero(self._bitmap[slots >> np.uint64(3)] & _bit(slots))
        found = np.zeros(len(values), dtype=bool)
        found[maybe] = contains_sorted(self.ids, values[maybe])
        return found


_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: Knuth's multiplicative hash


def _slots(values: np.ndarray, bits: int) -> np.ndarray:
    return (values.astype(np.int64, copy=False).view(np.uint64) * _MIX) >> np.uint64(64 - bits)


def _bit(slots: np.ndarray) -> np.ndarray:
    return np.left_shift(np.uint8(1), (slots & np.uint64(7)).astype(np.uint8))


def url_hashes(urls: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """128-bit blake2b of each string's UTF-8 bytes, as an (n, 2) uint64 array; nulls hash as ""."""
    if isinstance(urls, pa.ChunkedArray):
        urls = urls.combine_chunks()
    if not pa.types.is_large_string(urls.type):
        urls = urls.cast(pa.large_string())
    n = len(urls)
    if n == 0:
        return EMPTY_HASHES.copy()
    buffers = urls.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[urls.offset : urls.offset + n + 1]
    data = memoryview(buffers[2]) if buffers[2] is not None else memoryview(b"")
    blake = hashlib.blake2b
    starts = offsets[:-1].tolist()
    ends = offsets[1:].tolist()
    digests = b"".join(
        [blake(data[a:b], digest_size=16).digest() for a, b in zip(starts, ends, strict=True)]
    )
    return np.frombuffer(digests, dtype="<u8").reshape(n, 2).astype(np.uint64, copy=False)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    # np.sort then a neighbour test: np.unique's hash-based path is ~15x slower on 600k IDs.
    values = np.sort(values)
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def sort_unique_hashes(hashes: np.ndarray) -> np.ndarray:
    if len(hashes) == 0:
        return EMPTY_HASHES.copy()
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))
    hashes = hashes[order]
    keep = np.ones(len(hashes), dtype=bool)
    keep[1:] = np.any(hashes[1:] != hashes[:-1], axis=1)
    return np.ascontiguousarray(hashes[keep])


def contains_sorted(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Whether each needle is in the sorted array `haystack` (binary search, no hash set)."""
    if len(haystack) == 0 or len(needles) == 0:
        return np.zeros(len(needles), dtype=bool)
    pos = np.searchsorted(haystack, needles)
    np.minimum(pos, len(haystack) - 1, out=pos)
    return haystack[pos] == needles


def contains_hashes(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Whether each (n, 2) hash is in `haystack` (sorted by first then second word, unique).

    The search is on the first word; a haystack holding two hashes with the same first word
    (probability n^2 / 2^65) checks only the first of them.
    """
    if len(haystack) == 0 or len(needles) == 0:
        return np.zeros(len(needles), dtype=bool)
    pos = np.searchsorted(haystack[:, 0], needles[:, 0])
    np.minimum(pos, len(haystack) - 1, out=pos)
    found = haystack[pos]
    return (found[:, 0] == needles[:, 0]) & (found[:, 1] == needles[:, 1])


def _from_values(values: Iterable[Any], url: str) -> tuple[list[np.ndarray], list[str]]:
    """IDs and URLs of a flat collection of Python ints / strings (one pass, no per-item numpy)."""
    values = values if isinstance(values, list) else list(values)
    if not values:
        return [], []
    if all(type(v) is int for v in values):  # not bool, not float
        try:
            return [np.array(values, dtype=np.int64)], []
        except OverflowError:
            raise IdListError(f"{url}: an ID does not fit in int64") from None
    if all(isinstance(v, str) for v in values):
        return [], values
    kinds = sorted({type(v).__name__ for v in values})
    raise IdListError(
        f"{url}: unknown ID list layout: a collection of {', '.join(kinds)}; "
        f"expected ints (SAMPLE_IDs) or strings (URLs). Layouts read: {LAYOUTS}"
    )


def _from_array(array: np.ndarray, url: str) -> tuple[list[np.ndarray], list[str]]:
    if array.dtype.kind in "iu":
        if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
            raise IdListError(f"{url}: an ID does not fit in int64")
        return [array.ravel().astype(np.int64)], []
    if array.dtype.kind in "US":
        return [], [str(v) for v in array.ravel().tolist()]
    if array.dtype.kind == "O":
        return _from_values(array.ravel().tolist(), url)
    raise IdListError(
        f"{url}: unknown ID list layout: a {array.dtype} array; expected integers (SAMPLE_IDs) "
        f"or strings (URLs). Layouts read: {LAYOUTS}"
    )


def _from_torch_object(obj: Any, url: str, depth: int = 0) -> tuple[list[np.ndarray], list[str]]:
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex() or obj.dtype == torch.bool:
            raise IdListError(
                f"{url}: unknown ID list layout: a {obj.dtype} tensor; expected an integer "
                f"tensor of SAMPLE_IDs. Layouts read: {LAYOUTS}"
            )
        return [obj.detach().cpu().reshape(-1).to(torch.int64).numpy()], []
    if isinstance(obj, np.ndarray):
        return _from_array(obj, url)
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
        nested = [x for x in items if isinstance(x, (list, tuple, set, frozenset, np.ndarray))]
        nested += [x for x in items if isinstance(x, torch.Tensor)]
        if not nested:
            return _from_values(items, url)
        if depth == 0 and len(nested) == len(items):
            # LAION-Face's layout: one collection of IDs per LAION-400M part.
            ids: list[np.ndarray] = []
            urls: list[str] = []
            for part in items:
                part_ids, part_urls = _from_torch_object(part, url, depth + 1)
                ids += part_ids
                urls += part_urls
            return ids, urls
    described = type(obj).__name__
    if isinstance(obj, (list, tuple, set, frozenset)):
        described = f"a {described} mixing collections and values, or nested too deep"
    raise IdListError(f"{url}: unknown ID list layout: {described}. Layouts read: {LAYOUTS}")


def _numpy_safe_globals() -> list[Any]:
    """What torch's weights_only unpickler must allow to rebuild plain numpy arrays.

    Arrays are rebuilt from their raw bytes; object arrays still go through the restricted
    unpickler item by item, so nothing here can run code.
    """
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    # Files written under numpy 1.x name the function numpy.core..., under 2.x numpy._core...
    allowed: list[Any] = [
        np.ndarray,
        np.dtype,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
    ]
    # A dtype's state is set on an instance of its class (numpy.dtypes.Int64DType, ...).
    dtype_classes = getattr(np, "dtypes", None)
    if dtype_classes is not None:
        allowed += [getattr(dtype_classes, n) for n in dir(dtype_classes) if n.endswith("DType")]
    return allowed


def _read_torch(url: str) -> tuple[list[np.ndarray], list[str]]:
    import pickle

    import torch

    fs, path = storage.fs_for(url)
    try:
        with (
            fs.open(path, "rb") as handle,
            torch.serialization.safe_globals(_numpy_safe_globals()),
        ):
            obj = torch.load(handle, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IdListError(
            f"{url}: not a readable torch.save file with weights_only=True ({first_line}). "
            f"Layouts read: {LAYOUTS}"
        ) from None
    if isinstance(obj, dict):
        raise IdListError(
            f"{url}: unknown ID list layout: a dict with {len(obj)} keys. Layouts read: {LAYOUTS}"
        )
    return _from_torch_object(obj, url)


def _read_npy(url: str) -> tuple[list[np.ndarray], list[str]]:
    try:
        array = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    except ValueError as exc:
        raise IdListError(f"{url}: not a readable .npy without pickle ({exc}). {LAYOUTS}") from None
    return _from_array(array, url)


def _read_parquet(url: str, id_column: str, url_column: str) -> tuple:
    try:
        table = storage.read_parquet(url)
    except (pa.ArrowException, OSError) as exc:
        raise IdListError(f"{url}: not a readable parquet file ({exc})") from None
    names = table.column_names
    lowered = {n.lower(): n for n in names}
    id_names = [n for n in (id_column, "SAMPLE_ID", "sample_id", "id") if n]
    url_names = [n for n in (url_column, "URL", "url") if n]
    id_name = next((lowered[n.lower()] for n in id_names if n.lower() in lowered), None)
    url_name = next((lowered[n.lower()] for n in url_names if n.lower() in lowered), None)
    if id_name is None and url_name is None and len(names) == 1:
        only = table.column(0)
        if pa.types.is_integer(only.type):
            id_name = names[0]
        elif pa.types.is_string(only.type) or pa.types.is_large_string(only.type):
            url_name = names[0]
    if id_name is None and url_name is None:
        raise IdListError(
            f"{url}: unknown ID list layout: parquet columns {names}; expected a column named "
            f"{' or '.join(id_names)} (IDs) or {' or '.join(url_names)} (URLs), or a single "
            f"integer or string column. Layouts read: {LAYOUTS}"
        )
    ids: list[np.ndarray] = []
    urls: list[str] = []
    if id_name is not None:
        column = table.column(id_name)
        if not pa.types.is_integer(column.type):
            raise IdListError(f"{url}: column {id_name!r} is {column.type}, expected integers")
        ids.append(pc.drop_null(column).to_numpy().astype(np.int64))
    if url_name is not None:
        urls = pc.drop_null(table.column(url_name)).cast(pa.string()).to_pylist()
    return ids, urls


def _read_txt(url: str) -> tuple[list[np.ndarray], list[str]]:
    data = storage.read_bytes(url)
    if not data.strip():
        return [], []
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=["v"]),
            # One value per line: no delimiter or quote can split or join lines.
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={"v": pa.string()}),
        )
    except pa.ArrowInvalid as exc:
        raise IdListError(f"{url}: not a text list with one value per line ({exc})") from None
    values = pc.utf8_trim_whitespace(table.column("v"))
    values = values.filter(
        pc.and_(pc.not_equal(values, ""), pc.invert(pc.starts_with(values, "#")))
    )
    is_int = pc.match_substring_regex(values, r"^[+-]?[0-9]+$")
    try:
        ids = pc.cast(values.filter(is_int), pa.int64()).to_numpy()
    except pa.ArrowInvalid:
        raise IdListError(f"{url}: an ID does not fit in int64") from None
    urls = values.filter(pc.invert(is_int)).to_pylist()
    return [ids], urls


def read_list(url: str, *, id_column: str = "SAMPLE_ID", url_column: str = "URL") -> IdList:
    """Read an ID/URL list in any layout of LAYOUTS; errors name the file and those layouts."""
    name = posixpath.basename(url.rstrip("/")).lower()
    suffix = posixpath.splitext(name)[1]
    readers = {
        ".pth": _read_torch,
        ".pt": _read_torch,
        ".npy": _read_npy,
        ".parquet": lambda u: _read_parquet(u, id_column, url_column),
        ".txt": _read_txt,
    }
    reader = readers.get(suffix)
    if reader is None:
        raise IdListError(
            f"{url}: unknown ID list layout (file extension {suffix or 'none'!r}). "
            f"Layouts read: {LAYOUTS}"
        )
    if not storage.exists(url):
        raise IdListError(f"{url}: ID list not found")
    ids, urls = reader(url)
    merged = _sorted_unique(np.concatenate(ids)) if ids else EMPTY_IDS.copy()
    hashes = sort_unique_hashes(url_hashes(pa.array(urls, pa.large_string())))
    return IdList(ids=merged, url_hashes=hashes)


def save_list(id_list: IdList, base_url: str) -> None:
    """Write `saved_files(base_url)` (atomic), what workers load."""
    for url, array in zip(saved_files(base_url), (id_list.ids, id_list.url_hashes), strict=True):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        storage.write_bytes(url, buffer.getvalue())


def _load_array(url: str) -> np.ndarray:
    fs, path = storage.fs_for(url)
    if isinstance(fs, LocalFileSystem):
        # Memory-mapped: the workers of one machine share the page cache instead of each copying.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)


# Lists loaded in this process, keyed by (base URL, version of its IDs file); a list rewritten by
# a later run loads again. Few entries: a run has at most an id_list and an exclude_list.
_LOADED: dict[tuple[str, str | None], IdList] = {}
_MAX_LOADED = 4


def saved_files(base_url: str) -> tuple[str, str]:
    """The two files `save_list` writes for `base_url`: the IDs and the URL hashes."""
    return f"{base_url}.ids.npy", f"{base_url}.urls.npy"


def load_saved_list(base_url: str) -> IdList:
    """The list `save_list` wrote at `base_url`, loaded once per process per version."""
    ids_url, urls_url = saved_files(base_url)
    key = (base_url, storage.file_versions([ids_url])[ids_url])
    cached = _LOADED.get(key)
    if cached is not None:
        return cached
    loaded = IdList(ids=_load_array(ids_url), url_hashes=_load_array(urls_url))
    while len(_LOADED) >= _MAX_LOADED:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[key] = loaded
    return loaded
