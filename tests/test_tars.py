"""TarWriter's tars: the same bytes tarfile writes, read back by tarfile and by our reader."""

import io
import tarfile

import pytest

from laionface.io.tars import TarWriter, iter_members, ustar_header

# Short names, one at the 100-byte limit, non-ASCII, and one long enough for ustar's prefix field.
NAMES = ["000010002.jpg", "a.json", "k" * 96 + ".jpg", "é" * 40 + ".txt", "p" * 60 + "/" + "n" * 70]


def tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [0, 1, 511, 512, 10**6, 8**11 - 1])
def test_header_is_tarfiles(name, size):
    header = ustar_header(name, size)
    assert header == tarfile_header(name, size)
    info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
    assert (info.name, info.size, info.mode, info.mtime, info.uid) == (name, size, 0o644, 0, 0)


def test_written_tar_reads_back_member_for_member():
    members = [(name, name.encode() * 7) for name in ("000010002.jpg", "a.json", "k" * 96 + ".jpg")]
    buffer = io.BytesIO()
    writer = TarWriter(buffer)
    written = [writer.add(name, data) for name, data in members]
    writer.close()
    blob = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members
    read = [(m.name, data) for m, data in iter_members(io.BytesIO(blob), source="t.tar")]
    assert read == members
    for member, (_, data) in zip(written, members, strict=True):
        assert blob[member.data_offset : member.data_offset + member.size] == data
