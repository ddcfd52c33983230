"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.photos import SHARED

# The real RetinaFace weights: CI points LAIONFACE_WEIGHTS_DIR at ../shared/models; a developer's
# checkout beside shared/ gets the same without setting anything.
if "LAIONFACE_WEIGHTS_DIR" not in os.environ and (SHARED / "models").is_dir():
    os.environ["LAIONFACE_WEIGHTS_DIR"] = str(SHARED / "models")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory):
    """The default demo corpus (seed 0), built once per test session."""
    from laionface.corpus import build_corpus

    return build_corpus(tmp_path_factory.getbasetemp() / "demo-corpus-seed0", seed=0)


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    path = SHARED / "faces"
    if not path.is_dir():
        pytest.fail(
            f"{path} is missing: the tests need the public-domain face photos in shared/faces"
        )
    return path
