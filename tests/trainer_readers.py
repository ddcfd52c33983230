"""Reads a published dataset the way training code does; run by tests/test_readers.py in the
readers' own environment (.venv-readers, tests/readers-requirements.txt), not by pytest.

    .venv-readers/bin/python tests/trainer_readers.py READER DATASET_FOLDER

READER is `webdataset` (a pipeline with decode, a resize and batching), `wids` (random access
through shardindex.json) or `openclip` (OpenCLIP's own training reader, get_wds_dataset). It
prints one JSON object of what it read, for the test to check. It imports nothing of laionface:
the readers see only the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

SIDE = 224


def _shards(folder: Path) -> str:
    """The tars as a brace pattern, from sizes.json (the way a user names them)."""
    names = sorted(json.loads((folder / "sizes.json").read_text()))
    return str(folder / f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar")


def _counted_ok(sample_json: dict) -> bool:
    return sum(face["counted"] for face in sample_json["faces"]) == sample_json["n_faces"]


def read_webdataset(folder: Path) -> dict:
    import torch
    import webdataset as wds
    from torchvision import transforms

    resize = transforms.Compose([transforms.Resize((SIDE, SIDE)), transforms.ToTensor()])
    pipeline = (
        wds.WebDataset(_shards(folder), shardshuffle=False)
        .decode("pil")
        .to_tuple("__key__", "jpg", "json", "txt")
        .map_tuple(lambda key: key, resize, lambda meta: meta, lambda text: text)
        .batched(16, partial=True)
    )
    keys, shapes, counted_ok, captions_ok = [], set(), True, True
    for batch_keys, images, metas, texts in pipeline:
        assert isinstance(images, torch.Tensor)
        shapes.add(tuple(images.shape[1:]))
        keys += list(batch_keys)
        counted_ok &= all(_counted_ok(meta) for meta in metas)
        captions_ok &= all(meta["caption"] == text for meta, text in zip(metas, texts, strict=True))
    return {
        "keys": keys,
        "batch_shapes": sorted(shapes),
        "counted_ok": counted_ok,
        "captions_ok": captions_ok,
    }


def read_wids(folder: Path) -> dict:
    import tempfile

    import wids

    with tempfile.TemporaryDirectory() as cache:
        dataset = wids.ShardListDataset(str(folder / "shardindex.json"), cache_dir=cache)
        picked = [0, len(dataset) // 2, len(dataset) - 1]
        samples = [dataset[i] for i in picked]
        return {
            "length": len(dataset),
            "dataset_name": dataset.dataset_name,
            "picked": {
                str(i): {
                    "key": sample["__key__"],
                    "json_key": sample[".json"]["key"],
                    "image_size": list(sample[".jpg"].size),
                    "json_size": [sample[".json"]["width"], sample[".json"]["height"]],
                    "counted_ok": _counted_ok(sample[".json"]),
                }
                for i, sample in zip(picked, samples, strict=True)
            },
        }


def read_openclip(folder: Path) -> dict:
    import open_clip
    from open_clip_train.data import get_dataset_size, get_wds_dataset

    shards = _shards(folder)
    args = SimpleNamespace(
        train_data=shards,
        val_data=shards,
        train_num_samples=None,
        val_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=8,
        workers=1,
        world_size=1,
    )
    preprocess = open_clip.image_transform(SIDE, is_train=True)
    size, n_shards = get_dataset_size(shards)
    train = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.tokenize)
    train_batches = [tuple(images.shape) for images, _ in train.dataloader]
    # The evaluation path reads every sample once (partial last batch).
    evaluation = get_wds_dataset(args, preprocess, is_train=False, tokenizer=open_clip.tokenize)
    seen, text_shapes = 0, set()
    for images, texts in evaluation.dataloader:
        seen += images.shape[0]
        text_shapes.add(tuple(texts.shape[1:]))
    return {
        "dataset_size": size,
        "shards": n_shards,
        "train_num_samples": train.dataloader.num_samples,
        "train_num_batches": train.dataloader.num_batches,
        "train_batches": train_batches,
        "eval_samples": seen,
        "text_shapes": sorted(text_shapes),
    }


READERS = {"webdataset": read_webdataset, "wids": read_wids, "openclip": read_openclip}

if __name__ == "__main__":
    reader, folder = sys.argv[1], Path(sys.argv[2])
    print(json.dumps(READERS[reader](folder)))
