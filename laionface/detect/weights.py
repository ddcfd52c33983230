"""Find, fetch and load the RetinaFace checkpoints, always checked against their sha256.

Resolution order for a network's weights:
1. an explicit file (`faces.weights`),
2. the folder named by the environment variable `LAIONFACE_WEIGHTS_DIR`,
3. the cache folder (`$XDG_CACHE_HOME/laionface/weights`, else `~/.cache/laionface/weights`),
4. a download from the public URLs into the cache folder (temporary file, checked, then renamed).

In a folder both the plain name (`mobilenet0.25_Final.pth`) and facexlib's name
(`detection_mobilenet0.25_Final.pth`) are accepted. A file whose sha256 differs from the published
one is refused, wherever it came from: the checkpoints are untrusted input, and a wrong file would
silently produce wrong detections. They are loaded with `weights_only=True`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from laionface.io import storage

ENV_WEIGHTS_DIR = "LAIONFACE_WEIGHTS_DIR"
_CHUNK = 1 << 20


class WeightsError(RuntimeError):
    """Weights that can't be found, fetched or trusted; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    network: str
    filename: str
    sha256: str
    size_hint: str
    urls: tuple[str, ...]

    @property
    def accepted_names(self) -> tuple[str, ...]:
        return (self.filename, f"detection_{self.filename}")


CHECKPOINTS = {
    "mobilenet0.25": Checkpoint(
        network="mobilenet0.25",
        filename="mobilenet0.25_Final.pth",
        sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
        size_hint="1.7 MB",
        urls=(
            "https://github.com/elliottzheng/face-detection/releases/download/0.0.1/mobilenet0.25_Final.pth",
            "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_mobilenet0.25_Final.pth",
        ),
    ),
    "resnet50": Checkpoint(
        network="resnet50",
        filename="Resnet50_Final.pth",
        sha256="6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
        size_hint="105 MB",
        urls=(
            "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
        ),
    ),
}


def checkpoint_for(network: str) -> Checkpoint:
    try:
        return CHECKPOINTS[network]
    except KeyError:
        raise WeightsError(
            f"unknown network {network!r}; choose one of {sorted(CHECKPOINTS)}"
        ) from None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "laionface" / "weights"


def sha256_of(path: str | Path) -> str:
    """The file's sha256, remembered per (path, size, mtime): workers re-resolve per shard."""
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, checkpoint: Checkpoint) -> Path:
    actual = sha256_of(path)
    if actual != checkpoint.sha256:
        raise WeightsError(
            f"{path}: sha256 {actual} does not match the published {checkpoint.network} "
            f"checkpoint ({checkpoint.sha256}); the file is corrupt or a different model. "
            f"Delete it and put the right file there (from {checkpoint.urls[0]})."
        )
    return path


def _find_in(folder: Path, checkpoint: Checkpoint) -> Path | None:
    for name in checkpoint.accepted_names:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _download(url: str, destination: Path, checkpoint: Checkpoint, timeout: float) -> None:
    """Stream `url` into `destination` atomically; the file appears only if its sha256 matches."""
    digest = hashlib.sha256()
    # A private opener: the download stage may install a process-wide one with its own rules.
    opener = urllib.request.build_opener()
    with opener.open(url, timeout=timeout) as response:
        with storage.atomic_open(str(destination), "wb") as handle:
            while block := response.read(_CHUNK):
                digest.update(block)
                handle.write(block)
            if digest.hexdigest() != checkpoint.sha256:
                raise WeightsError(
                    f"{url}: downloaded sha256 {digest.hexdigest()} does not match the published "
                    f"{checkpoint.sha256}; the file was not kept"
                )


def resolve_weights(
    network: str = "mobilenet0.25",
    weights: str | os.PathLike[str] = "",
    *,
    urls: Sequence[str] | None = None,
    download: bool = True,
    timeout: float = 60.0,
) -> Path:
    """The verified local path of `network`'s checkpoint, downloading it into the cache if needed.

    `urls` replaces the public download URLs (mirrors, tests). Raises `WeightsError` with the file
    name, checksum, URLs and where to put the file when nothing works.
    """
    checkpoint = checkpoint_for(network)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"faces.weights = {str(weights)!r}: no such file")
        return _verified(path, checkpoint)

    env_folder = os.environ.get(ENV_WEIGHTS_DIR, "")
    if env_folder:
        found = _find_in(Path(env_folder).expanduser(), checkpoint)
        if found is not None:
            return _verified(found, checkpoint)

    cache = cache_dir()
    found = _find_in(cache, checkpoint)
    if found is not None:
        return _verified(found, checkpoint)

    sources = tuple(urls) if urls is not None else checkpoint.urls
    failures = []
    if download:
        destination = cache / checkpoint.filename
        for url in sources:
            try:
                _download(url, destination, checkpoint, timeout)
                return destination
            except (OSError, urllib.error.URLError, WeightsError) as exc:
                failures.append(f"{url}: {exc}")

    searched = ([f"{ENV_WEIGHTS_DIR}={env_folder}"] if env_folder else []) + [str(cache)]
    tried = "\n  ".join(failures) if failures else "(downloads disabled)"
    raise WeightsError(
        f"RetinaFace {network} weights not found: need {checkpoint.filename} "
        f"(or {checkpoint.accepted_names[1]}), {checkpoint.size_hint}, "
        f"sha256 {checkpoint.sha256}.\n"
        f"Looked in: {', '.join(searched)}.\n"
        f"Download tried:\n  {tried}\n"
        f"Fix: download it from one of {', '.join(sources)} on a machine with internet and put it "
        f"in the folder named by {ENV_WEIGHTS_DIR} or in {cache}, or set faces.weights to the file."
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, with a DataParallel `module.` prefix removed if present."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a usable checkpoint"
        raise WeightsError(f"{path}: not a loadable PyTorch state dict ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}
