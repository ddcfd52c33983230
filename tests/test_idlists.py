"""ID lists in torch.save files: LAION-Face's layout read without an unpickler, the rest through
torch.load(weights_only=True), and nothing in a file ever run."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from laionface.stages.metadata import idlists
from laionface.stages.metadata.idlists import IdListError

REPO = Path(__file__).resolve().parents[1]

# One of each way pickle writes an int: 1, 2 and 4 bytes, then 1 to 8 bytes of LONG1.
INTS_OF_EVERY_WIDTH = [0, 1, 255, 256, 65535, 65536, -1, -129, 2**31 - 1, 2**31, -(2**31)]
INTS_OF_EVERY_WIDTH += [-(2**31) - 1, 2**39, -(2**39), 2**47 + 5, 2**55, -(2**55), 2**63 - 1]
INTS_OF_EVERY_WIDTH += [-(2**63)]


def laion_face_parts(seed: int) -> list[list[int]]:
    """32 lists of int SAMPLE_IDs like laion_face_ids.pth, of sizes around the pickler's batches of
    1000 items (empty, one item, 999-1001, 2001), with ints of every width and a repeated ID."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 2, 999, 1000, 1001, 2000, 2001] + rng.integers(0, 2500, 24).tolist()
    parts = []
    for size in sizes:
        values = rng.integers(-(2**63), 2**63 - 1, size, dtype=np.int64, endpoint=True)
        widths = rng.integers(1, 64, size)
        parts.append([int(v) >> int(64 - w) for v, w in zip(values, widths, strict=True)])
    parts[9] += INTS_OF_EVERY_WIDTH
    parts[10] += parts[3][:5]
    return parts


def expected_ids(lists: list[list[int]]) -> list[int]:
    return sorted({v for part in lists for v in part})


def write_torch_zip(path: Path, data_pkl: bytes) -> None:
    """A .pth as torch.save lays it out (an uncompressed zip), around a pickle made here."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 3])
def test_laion_face_layout_loads_every_id(tmp_path, legacy, protocol):
    parts = laion_face_parts(seed=protocol)
    path = tmp_path / "laion_face_ids.pth"
    torch.save(parts, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    listed = idlists.read_list(str(path))
    assert listed.ids.dtype == np.int64
    assert listed.ids.tolist() == expected_ids(parts)
    assert len(listed.url_hashes) == 0


@pytest.mark.parametrize(
    "saved",
    [[], [7], [5, 3, 5], list(range(-1500, 1600)), [[]], [[9]], [[], [4], [], [1, 2]]],
    ids=["empty", "one", "three", "flat-3100", "one-empty-list", "one-list-of-one", "lists"],
)
def test_plain_int_lists_of_any_shape_load(tmp_path, saved):
    torch.save(saved, tmp_path / "ids.pth")
    listed = idlists.read_list(str(tmp_path / "ids.pth"))
    lists = saved if saved and isinstance(saved[0], list) else [saved]
    assert listed.ids.tolist() == expected_ids(lists)


def test_laion_face_layout_is_read_without_torch(tmp_path):
    """The hot path runs no unpickler at all: torch is not even imported; a list holding a
    tensor still goes through torch.load."""
    plain, with_tensor = tmp_path / "laion_face_ids.pth", tmp_path / "with_tensor.pth"
    parts = laion_face_parts(seed=0)
    torch.save(parts, plain)
    torch.save([[1, 2], torch.tensor([3, 4])], with_tensor)
    code = (
        "import sys; from laionface.stages.metadata import idlists; "
        "listed = idlists.read_list(sys.argv[1]); print(len(listed.ids), 'torch' in sys.modules)"
    )
    for path, expected in ((plain, len(expected_ids(parts))), (with_tensor, 4)):
        run = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        assert run.stdout.split() == [str(expected), str(path == with_tensor)]


_SHARED = [11, 12]


@pytest.mark.parametrize(
    ("saved", "ids"),
    [
        ([[1, 2], torch.tensor([3, 4]), np.array([5, 6], np.int64)], [1, 2, 3, 4, 5, 6]),
        (torch.tensor([[8, 7], [7, 9]]), [7, 8, 9]),
        ((3, 1, 2), [1, 2, 3]),
        ({4, 5}, [4, 5]),
        ([(1, 2), {3}, [4]], [1, 2, 3, 4]),
        ([_SHARED, _SHARED], [11, 12]),  # one list twice: a memo reference
    ],
    ids=["tensor-and-array-parts", "tensor", "tuple", "set", "tuple-and-set-parts", "shared"],
)
def test_other_pth_layouts_still_load_through_weights_only(tmp_path, saved, ids):
    torch.save(saved, tmp_path / "ids.pth")
    assert idlists.read_list(str(tmp_path / "ids.pth")).ids.tolist() == ids


def test_url_lists_in_pth_still_load(tmp_path):
    urls = ["https://img.example.com/1.jpg", "https://img.example.com/2.jpg"]
    torch.save(urls, tmp_path / "urls.pth")
    listed = idlists.read_list(str(tmp_path / "urls.pth"))
    assert len(listed.ids) == 0
    expected = idlists.sort_unique_hashes(idlists.url_hashes(idlists.pa.array(urls)))
    assert np.array_equal(listed.url_hashes, expected)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**100])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_ids_beyond_int64_are_refused(tmp_path, value, legacy):
    path = tmp_path / "laion_face_ids.pth"
    torch.save([[1, 2], [3, value, 4]], path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(IdListError, match="does not fit in int64") as error:
        idlists.read_list(str(path))
    assert str(path) in str(error.value)


def test_bools_are_not_ids(tmp_path):
    torch.save([[1, 2], [True, 3]], tmp_path / "ids.pth")
    with pytest.raises(IdListError, match="unknown ID list layout: a collection of bool, int"):
        idlists.read_list(str(tmp_path / "ids.pth"))


class _MakeDir:
    """Unpickles as a call of os.mkdir: loading it would create the folder."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class _Part:
    """A class of this module: unpickling one builds an object of a class named by the file."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


@pytest.mark.parametrize(
    "where", ["a-part", "among-ints", "the-whole-list", "a-class", "a-persistent-id"]
)
def test_code_or_classes_in_a_laion_face_list_are_refused_without_running(tmp_path, where):
    marker = tmp_path / "ran"
    parts = laion_face_parts(seed=5)
    path = tmp_path / "laion_face_ids.pth"
    if where == "a-persistent-id":  # what a tensor pickles as, with an id torch never wrote
        pickler_out = io.BytesIO()
        pickler = pickle.Pickler(pickler_out, protocol=2)
        pickler.persistent_id = lambda obj: "evil" if obj == parts[4][0] else None
        pickler.dump(parts)
        write_torch_zip(path, pickler_out.getvalue())
    else:
        if where == "a-part":
            parts[5] = _MakeDir(marker)
        elif where == "among-ints":
            parts[5] = [1, 2, _MakeDir(marker), 3]
        elif where == "a-class":
            parts[5] = _Part([1, 2])
        torch.save(_MakeDir(marker) if where == "the-whole-list" else parts, path)
    with pytest.raises(IdListError, match="weights_only=True") as error:
        idlists.read_list(str(path))
    assert str(path) in str(error.value) and idlists.LAYOUTS in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_laion_face_list_is_named(tmp_path, legacy):
    path = tmp_path / "laion_face_ids.pth"
    torch.save(laion_face_parts(seed=6), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdListError, match="not a readable torch.save file") as error:
        idlists.read_list(str(path))
    assert str(path) in str(error.value)
