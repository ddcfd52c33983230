"""Tar shards read safely and written deterministically, with every member's byte offsets.

Reading: tars from the web's data are untrusted, so only regular members with plain names (no
path components, no leading dot) and a bounded size are accepted; anything else stops the read
with `UnsafeTar` naming the member. Writing: `TarWriter` writes ustar headers with mtime 0,
uid/gid 0, empty owner names and mode 0o644, so the same members give byte-identical tars.
Both sides hash the bytes as they pass (`HashingReader`, `HashingWriter`), so a shard is read or
written once and its checksums come for free.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar files are padded to a multiple of this

# webdataset's rule: the key is the member name up to its first dot, the rest is the extension.
KEY_PATTERN = re.compile(r"[0-9A-Za-z_-]+")
EXT_PATTERN = re.compile(r"[0-9a-z]+")

# Larger members are refused unread (images are capped far lower by download.max_bytes).
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024


class UnsafeTar(ValueError):
    """A tar member that laionface refuses to read; the message names the member."""


@dataclass(frozen=True)
class Member:
    """One regular member: its name split into key and extension, and where its bytes lie."""

    name: str
    key: str
    ext: str
    offset: int  # start of its header
    data_offset: int  # start of its data
    size: int

    @property
    def end(self) -> int:
        """End of its data's padding: where the next header starts."""
        return self.data_offset + -(-self.size // BLOCK) * BLOCK


def split_name(name: str) -> tuple[str, str]:
    """("000010002", "jpg") for "000010002.jpg": key up to the first dot, as webdataset does."""
    key, _, ext = name.partition(".")
    return key, ext


def name_problem(name: str) -> str | None:
    """Why `name` breaks the webdataset naming rules, or None."""
    key, ext = split_name(name)
    if not KEY_PATTERN.fullmatch(key):
        return f"member {name!r}: key {key!r} must be letters, digits, '_' or '-'"
    if "." in ext:
        return f"member {name!r}: a key must not contain dots (webdataset splits at the first)"
    if not EXT_PATTERN.fullmatch(ext):
        return f"member {name!r}: extension {ext!r} must be lower-case letters or digits"
    return None


class HashingReader:
    """A read-only file wrapper that md5s and sha256s every byte read through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.md5.update(data)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self, chunk: int = 8 * 1024 * 1024) -> None:
        """Read (and hash) whatever is left, e.g. the padding after a tar's end marker."""
        while self.read(chunk):
            pass


class HashingWriter(io.RawIOBase):
    """A write-only stream that md5s and sha256s every byte written through it to `raw`.

    A real io stream, so pyarrow's writers accept it; closing it leaves `raw` open.
    """

    def __init__(self, raw: IO[bytes]):
        super().__init__()
        self.raw = raw
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.raw.write(data)
        self.md5.update(data)
        self.sha256.update(data)
        size = memoryview(data).nbytes
        self.size += size
        return size

    def tell(self) -> int:
        return self.size


def iter_members(
    fileobj: IO[bytes],
    *,
    source: str,
    wanted=None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[tuple[Member, bytes | None]]:
    """Yield (member, data) for each member of a tar read sequentially from `fileobj`.

    `data` is the member's bytes when `wanted(member)` is true (all when `wanted` is None), else
    None and the bytes are skipped. One sequential pass: works on any stream (an s3 object too).
    Raises UnsafeTar for a link, device, folder, path-like name or oversized member.
    """
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                name = info.name
                if not info.isreg():
                    raise UnsafeTar(f"{source}: member {name!r} is not a regular file")
                if "/" in name or "\\" in name or name.startswith(".") or not name:
                    raise UnsafeTar(f"{source}: member {name!r} has a path, not a plain name")
                if info.size > max_member_bytes:
                    raise UnsafeTar(
                        f"{source}: member {name!r} has {info.size:,} bytes, over the "
                        f"{max_member_bytes:,} byte cap"
                    )
                key, ext = split_name(name)
                member = Member(name, key, ext, info.offset, info.offset_data, info.size)
                data = None
                if wanted is None or wanted(member):
                    handle = tar.extractfile(info)
                    data = handle.read() if handle is not None else b""
                yield member, data
    except tarfile.TarError as exc:
        raise UnsafeTar(f"{source}: not a readable tar ({exc})") from None


def members_of(
    fileobj: IO[bytes], keys: set[str], *, source: str, read: Callable[[Member], bool]
) -> Iterator[tuple[Member, bytes | None]]:
    """(member, data) of the members whose key is one of `keys`, in tar order, in one pass;
    `data` is read only when `read(member)` is true (None otherwise)."""
    for member, data in iter_members(
        fileobj, source=source, wanted=lambda m: m.key in keys and read(m)
    ):
        if member.key in keys:
            yield member, data


# The ustar header of a member TarWriter writes, but for its name, size and checksum: what
# tarfile writes for mode 0o644, uid/gid 0, mtime 0, no owner names (fields in POSIX order).
_HEADER_HEAD = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid (after the 100-byte name)
_HEADER_MTIME = b"00000000000\x00"
# Type "0", no link name, POSIX magic and version, no owner names, no device numbers.
_HEADER_TAIL = b"0" + b"\x00" * 100 + b"ustar\x0000" + b"\x00" * (64 + 16)
_HEADER_PAD = b"\x00" * 167  # prefix (155) and the 12 bytes to the block's end


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header `tarfile` writes for a regular member `name` of `size` bytes with
    TarWriter's fixed fields; built directly (tarfile's TarInfo costs ~100 us a member) when
    the name fits the name field, else by tarfile itself."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    head = encoded.ljust(100, b"\x00") + _HEADER_HEAD + b"%011o\x00" % size + _HEADER_MTIME
    checksum = sum(head) + 8 * 32 + sum(_HEADER_TAIL)  # the checksum field counts as spaces
    return head + b"%06o\x00 " % checksum + _HEADER_TAIL + _HEADER_PAD


class TarWriter:
    """Writes a tar member by member to a plain stream, tracking each member's offsets."""

    def __init__(self, fileobj: IO[bytes] | HashingWriter):
        self.fileobj = fileobj
        self.offset = 0

    def add(self, name: str, data: bytes) -> Member:
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        header = ustar_header(name, len(data))
        key, ext = split_name(name)
        member = Member(name, key, ext, self.offset, self.offset + len(header), len(data))
        padding = -len(data) % BLOCK
        self._write(header)
        self._write(data)
        self._write(b"\0" * padding)
        return member

    def close(self) -> None:
        """The end marker (two zero blocks), padded to a whole record like GNU tar and tarfile."""
        end = self.offset + 2 * BLOCK
        self._write(b"\0" * (2 * BLOCK + -end % RECORD))

    def _write(self, data: bytes) -> None:
        self.fileobj.write(data)
        self.offset += len(data)
