"""ID and URL lists for the metadata stage: `metadata.id_list` (keep) and `metadata.exclude_list`.

A list holds SAMPLE_IDs, URLs, or both; a row matches when its SAMPLE_ID is among the IDs or its
URL among the URLs. The layouts read (the error for any other names them all):

- `.pth` / `.pt`: `torch.load(weights_only=True)` of an integer tensor, a list/tuple/set of ints
  or of URL strings, or LAION-Face's `laion_face_ids.pth`: a list of 32 collections (one per
  LAION-400M part) of int SAMPLE_IDs, each a list, tuple, set, integer tensor or integer numpy
  array. The collections are merged, so an ID selects its row in whichever part holds it. A file
  that is exactly a list of ints or of lists of ints (LAION-Face's own file) is read without any
  unpickler, its opcodes parsed with numpy (50M IDs in seconds instead of ~45 s); see below.
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
import itertools
import math
import os
import pickle
import pickletools
import posixpath
import re
import struct
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
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


_SORT_CHUNK = 4_000_000  # values per thread at least: below, one np.sort is as fast


def _sort_in_place(values: np.ndarray) -> None:
    """np.sort on up to 4 threads (numpy lets go of the GIL while it sorts): chunks sorted side
    by side, then merged by timsort (kind="stable"), which takes each chunk as one run."""
    workers = min(4, os.cpu_count() or 1, len(values) // _SORT_CHUNK)
    if workers < 2:
        values.sort()
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(np.ndarray.sort, np.array_split(values, workers)))
    values.sort(kind="stable")


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted; sorts `values` in place."""
    # A sort then a neighbour test: np.unique's hash-based path is ~15x slower on 600k IDs.
    _sort_in_place(values)
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


# ---------------------------------------------------------------------------------------------
# .pth files of plain int lists, read without an unpickler
#
# torch.save pickles the object (protocol 2 unless told otherwise) into `<name>/data.pkl` of an
# uncompressed zip or, in its legacy format, between three header pickles and a pickled list of
# storage keys. Python's picklers write a list of ints as EMPTY_LIST `]`, BINPUT `q` (LONG_BINPUT
# `r`), then batches of at most 1000 items: MARK `(`, the items, APPENDS `e` (a list of one item:
# the item, APPEND `a`); an int as BININT1 `K` (1 byte), BININT2 `M` (2), BININT `J` (4, signed)
# or LONG1 (0x8a, n, then n bytes, signed little-endian). LAION-Face's ~50M IDs are ~450 MB of
# such items, which torch's pure-Python unpickler takes 45-110 s to read, and Python's C one ~5 s
# plus as long again to convert its 2 GB of int objects (benchmarks/bench_idlist.py). Here numpy
# reads the items as numbers, every batch side by side, one item per step (within a batch an item
# is found only after the one before it): 3-4 s for 50M IDs. A file is read this way only if its
# whole pickle is a list of ints or a list of lists of ints in exactly these opcodes; anything
# else (a tensor, a numpy array, a string, an int beyond int64, a bool, another protocol) goes to
# torch.load(weights_only=True). Nothing in the file is ever called.

_BATCH = 1000  # the picklers' batch of list items (pickle._BATCHSIZE, BATCHSIZE in _pickle.c)
_PROTO, _MARK, _APPENDS, _APPEND, _EMPTY_LIST, _BINPUT, _LONG_BINPUT, _STOP = b"\x80(ea]qr."
_BININT1, _BININT2, _BININT, _LONG1 = b"KMJ\x8a"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_TORCH_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_PAD = 16  # zero bytes after the pickle: reading 8 bytes at any item stays inside the buffer
_WINDOW = 16384  # batches read side by side: their bytes stay in the CPU's caches


class _NotPlain(Exception):
    """The pickle is not a plain list of ints or of lists of ints (torch.load reads it)."""


@dataclass(frozen=True)
class _IntItems:
    """How an int item is laid out, per (opcode, next byte) read as one little-endian uint16."""

    length: np.ndarray  # bytes of the item; 0 where the pair starts no int item that fits int64
    offset: np.ndarray  # where the value's bytes start
    shift: np.ndarray  # 64 - the value's bits: shifting left, then right, sign-extends it
    mask: np.ndarray  # 0xFF, 0xFFFF for the unsigned BININT1 and BININT2; -1 for the others


@cache
def _int_items() -> _IntItems:
    keys = np.arange(1 << 16, dtype=np.int64)
    opcode, next_byte = keys & 0xFF, keys >> 8
    value_bytes = np.zeros(1 << 16, np.int64)  # 0: the pair starts no int item
    for code, size in ((_BININT1, 1), (_BININT2, 2), (_BININT, 4)):
        value_bytes[opcode == code] = size
    # LONG1 of 1-8 bytes; 0 (never written) and 9+ (beyond int64) are left to torch.load.
    long1 = (opcode == _LONG1) & (next_byte >= 1) & (next_byte <= 8)
    value_bytes[long1] = next_byte[long1]
    offset = np.where(long1, 2, 1)  # after the opcode, and LONG1's length byte
    return _IntItems(
        length=np.where(value_bytes > 0, offset + value_bytes, 0),
        offset=offset,
        shift=64 - 8 * value_bytes,
        mask=np.select([opcode == _BININT1, opcode == _BININT2], [0xFF, 0xFFFF], -1),
    )


def _unaligned(buf: np.ndarray, dtype: str) -> np.ndarray:
    """A read-only view whose item i is the little-endian `dtype` at byte i of `buf`."""
    size = np.dtype(dtype).itemsize
    view = np.ndarray((len(buf) - size + 1,), dtype, buffer=buf, strides=(1,))
    view.flags.writeable = False
    return view


def _int_values(buf: np.ndarray, positions: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The values of the int items at `positions`, whose (opcode, next byte) pairs are `keys`."""
    items = _int_items()
    shift = items.shift[keys]
    values = _unaligned(buf, "<i8")[positions + items.offset[keys]]
    return ((values << shift) >> shift) & items.mask[keys]


def _int_runs(buf: np.ndarray, starts: np.ndarray) -> tuple:
    """Read the int items from each of `starts` until a byte that starts none, side by side.

    Returns, per start, how many were read (-1: more than a batch) and where the run stopped,
    and the values as groups (start indexes, [their values at each step]).
    """
    items, keys_at = _int_items(), _unaligned(buf, "<u2")
    counts = np.full(len(starts), -1, np.int64)
    ends = np.full(len(starts), -1, np.int64)
    groups: list[tuple[np.ndarray, list[np.ndarray]]] = []
    for first in range(0, len(starts), _WINDOW):
        which = np.arange(first, min(first + _WINDOW, len(starts)))
        positions = starts[which]
        for step in range(_BATCH + 1):
            keys = keys_at[positions]
            lengths = items.length[keys]
            if step == 0 or not lengths.all():
                stop = lengths == 0
                counts[which[stop]], ends[which[stop]] = step, positions[stop]
                which, positions, keys, lengths = (
                    a[~stop] for a in (which, positions, keys, lengths)
                )
                groups.append((which, []))
            if step == _BATCH or not len(which):
                break  # runs still going after a whole batch keep count -1
            groups[-1][1].append(_int_values(buf, positions, keys))
            positions = positions + lengths
    return counts, ends, groups


def _batch_starts(buf: np.ndarray, size: int) -> np.ndarray:
    """Where a batch of list items may start: after `e(` or a list's `]q?(` / `]r????(`.

    Bytes inside an int may look the same; the walk keeps only the batches it reaches. A file
    with more of these than any list of ints would hold is not read here.
    """
    data = memoryview(buf)[:size]
    limit = size // 64 + 1024
    found = itertools.chain(
        re.finditer(rb"e\(", data), re.finditer(rb"\](?:q.|r....)\(", data, re.DOTALL)
    )
    starts = np.fromiter((m.end() for m in itertools.islice(found, limit + 1)), np.int64)
    if len(starts) > limit:
        raise _NotPlain("too many batch marks")
    return np.unique(starts)


def _walk(data: memoryview, starts: np.ndarray, counts: np.ndarray, ends: np.ndarray) -> tuple:
    """The batches (indexes into `starts`) and lone items of the pickle in `data`, and the end
    of its STOP; raises _NotPlain unless it is a list of ints or a list of lists of ints."""
    lengths = _int_items().length
    batch_at = dict(zip(starts.tolist(), range(len(starts)), strict=True))
    batches: list[int] = []
    singles: list[int] = []

    def expect(pos: int, opcode: int) -> int:
        if data[pos] != opcode:
            raise _NotPlain(f"byte {pos}: {data[pos]:#x}, expected {opcode:#x}")
        return pos + 1

    def new_list(pos: int) -> int:  # EMPTY_LIST, then BINPUT or LONG_BINPUT
        pos = expect(pos, _EMPTY_LIST)
        if data[pos] not in (_BINPUT, _LONG_BINPUT):
            raise _NotPlain(f"byte {pos}: {data[pos]:#x}, expected BINPUT or LONG_BINPUT")
        return pos + (2 if data[pos] == _BINPUT else 5)

    def ints(pos: int) -> int:  # a list's int items: one then APPEND, or batches
        length = int(lengths[data[pos] | data[pos + 1] << 8])
        if length:
            singles.append(pos)
            return expect(pos + length, _APPEND)
        while data[pos] == _MARK and (batch := batch_at.get(pos + 1)) is not None:
            if counts[batch] < 1:
                break
            batches.append(batch)
            pos = expect(int(ends[batch]), _APPENDS)
        return pos

    if data[0] != _PROTO or data[1] not in (2, 3):
        raise _NotPlain("not pickle protocol 2 or 3")
    pos = new_list(2)
    if data[pos] == _EMPTY_LIST:  # a list of one list
        pos = expect(ints(new_list(pos)), _APPEND)
    elif data[pos] == _MARK and data[pos + 1] == _EMPTY_LIST:  # a list of lists
        while data[pos] == _MARK and data[pos + 1] == _EMPTY_LIST:
            pos += 1
            while data[pos] == _EMPTY_LIST:
                pos = ints(new_list(pos))
            pos = expect(pos, _APPENDS)
    else:
        pos = ints(pos)
    return batches, singles, expect(pos, _STOP)


def _plain_ids(buf: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """The ints of the list (of lists) of ints pickled in buf[:size], and where its pickle ends.

    `buf` holds _PAD zero bytes after `size`; raises _NotPlain for any other pickle.
    """
    starts = _batch_starts(buf, size)
    counts, ends, groups = _int_runs(buf, starts)
    try:  # the padding holds zeros, no opcode the walk expects: it stops at a pickle cut short
        batches, singles, end = _walk(memoryview(buf), starts, counts, ends)
    except IndexError:
        raise _NotPlain("the pickle ends early") from None
    reached = np.zeros(len(starts), bool)
    reached[batches] = True
    ids = np.empty(int(counts[batches].sum()) + len(singles), np.int64)
    filled = 0
    for which, values in groups:  # the values of the batches reached, into one array
        keep = reached[which]
        kept = int(keep.sum())
        for step_values in values:
            np.compress(keep, step_values, out=ids[filled : filled + kept])
            filled += kept
        values.clear()  # the memory of the IDs is held once, not twice
    positions = np.array(singles, np.int64)
    ids[filled:] = _int_values(buf, positions, _unaligned(buf, "<u2")[positions])
    return ids, end


def _pickle_span(handle: Any, size: int) -> tuple[int, int, tuple[bytes, ...]]:
    """Where the object's pickle lies in a torch.save file: its start, its length up to the end
    of data.pkl or of the file, and the bytes that may follow its STOP there (the legacy format's
    empty list of storage keys). Raises _NotPlain for a file in neither of torch's formats."""
    head = handle.read(4096)
    if head[:4] == b"PK\x03\x04":
        try:
            handle.seek(0)
            with zipfile.ZipFile(handle) as archive:
                # torch names its records after the first one's folder (PyTorchStreamReader).
                folder = archive.namelist()[0].split("/")[0]
                info = archive.getinfo(f"{folder}/data.pkl")
        except (zipfile.BadZipFile, KeyError, IndexError, OSError, ValueError) as exc:
            raise _NotPlain(f"not a torch zip: {exc}") from None
        handle.seek(info.header_offset)
        local = handle.read(30)
        if info.compress_type != zipfile.ZIP_STORED or local[:4] != b"PK\x03\x04":
            raise _NotPlain("data.pkl is compressed or its header is damaged")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        return info.header_offset + 30 + name_length + extra_length, info.file_size, (b"",)
    # The legacy format: pickles of torch's magic number, its protocol version and a dict of
    # sys info, then the object's. pickletools reads their opcodes without building anything.
    header = io.BytesIO(head)
    try:
        pickles = [[arg for _, arg, _ in pickletools.genops(header)] for _ in range(3)]
    except ValueError as exc:
        raise _NotPlain(f"no torch header: {exc}") from None
    magic, protocol = (arguments[1:] for arguments in pickles[:2])  # after PROTO: value, STOP
    if magic != [_TORCH_LEGACY_MAGIC, None] or protocol != [_TORCH_LEGACY_PROTOCOL, None]:
        raise _NotPlain("no torch legacy header")
    no_storages = tuple(pickle.dumps([], protocol=p) for p in (2, 3))
    return header.tell(), size - header.tell(), no_storages


def _read_plain_torch(url: str) -> np.ndarray:
    """The IDs of a torch.save'd list (of lists) of ints, read without unpickling; raises
    _NotPlain for any other file (then torch.load reads it)."""
    fs, path = storage.fs_for(url)
    size = fs.size(path)
    with fs.open(path, "rb") as handle:
        start, length, tails = _pickle_span(handle, size)
        buf = np.zeros(length + _PAD, np.uint8)
        handle.seek(start)
        view, done = memoryview(buf)[:length], 0
        while done < length:
            got = handle.readinto(view[done:])
            if not got:
                raise _NotPlain("the file ends early")
            done += got
    ids, end = _plain_ids(buf, length)
    if bytes(buf[end:length]) not in tails:
        raise _NotPlain("more after the object's pickle")
    return ids


def _read_torch(url: str) -> tuple[list[np.ndarray], list[str]]:
    """A .pth list: a plain list (of lists) of ints without an unpickler, anything else with
    torch.load(weights_only=True), which builds tensors and numpy arrays and refuses code."""
    try:
        return [_read_plain_torch(url)], []
    except _NotPlain:
        pass
    import torch

    fs, path = storage.fs_for(url)
    try:
        with (
            fs.open(path, "rb") as handle,
            torch.serialization.safe_globals(_numpy_safe_globals()),
        ):
            obj = torch.load(handle, weights_only=True, map_location="cpu")
    except Exception as exc:  # a damaged file fails torch.load in every way (KeyError, ...)
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
