"""The public-domain face photos in shared/faces and their face counts, read from its README."""

from __future__ import annotations

import re
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
FACES_DIR = SHARED / "faces"


def readme_face_counts(faces_dir: Path = FACES_DIR) -> dict[str, int]:
    """{file: faces RetinaFace MobileNet-0.25 finds at score > 0.5}, from the README's table."""
    counts = {}
    for line in (faces_dir / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (faces_dir / cells[0]).is_file():
            counts[cells[0]] = int(re.match(r"\d+", cells[2]).group())
    return counts


PHOTOS = sorted(readme_face_counts()) if FACES_DIR.is_dir() else []
