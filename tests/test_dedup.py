"""The dedup stage: the hash search, clusters, keepers, the evaluation-set guard, both backends."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster
from PIL import Image

from laionface.config import Config
from laionface.dataset.contract import DATASET_SHARD
from laionface.engine.pipeline import stage_of
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext, StageFailed
from laionface.io.schemas import DEDUP, DROP_COUNTS, FACES, REFERENCE_HASHES, SELECT
from laionface.stages.dedup import hashindex, reference

# --------------------------------------------------------------------------------------------
# Helpers: a run folder with faces/ and select/ shards, as the earlier stages write them


def flip(value: int, *bits: int) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def sample(
    key: str,
    phash: int | None,
    *,
    sha: str | None = None,
    size: tuple[int, int] = (640, 480),
    scores: tuple[float, ...] = (0.99,),
    kept: bool = True,
) -> dict:
    return {
        "key": key,
        "phash": phash,
        "sha256": sha or hashlib.sha256(key.encode()).hexdigest(),
        "size": size,
        "scores": scores,
        "kept": kept,
    }


def write_shard(run_dir: Path, shard: str, samples: list[dict]) -> None:
    faces, select = [], []
    for i, s in enumerate(samples):
        faces.append(
            {
                "key": s["key"],
                "SAMPLE_ID": i,
                "width": s["size"][0],
                "height": s["size"][1],
                "phash": s["phash"],
                "sha256": s["sha256"],
                "decode_error": None,
                "faces": [
                    {"x1": 1, "y1": 1, "x2": 90, "y2": 90, "score": sc, "landmarks": [0.0] * 10}
                    for sc in s["scores"]
                ],
            }
        )
        select.append(
            {
                "key": s["key"],
                "SAMPLE_ID": i,
                "kept": s["kept"],
                "reason": None if s["kept"] else "no_face",
                "n_faces": len(s["scores"]),
            }
        )
    for folder, rows, schema in (("faces", faces, FACES), ("select", select, SELECT)):
        (run_dir / folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(rows, schema=schema), run_dir / folder / f"{shard}.parquet"
        )


def write_run(run_dir: Path, shards: dict[str, list[dict]]) -> Path:
    for shard, samples in shards.items():
        write_shard(run_dir, shard, samples)
    return run_dir


def config(**dedup_settings) -> Config:
    return Config.model_validate({"dedup": dedup_settings, "cluster": {"workers": 2}})


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as c,
        Client(c) as cl,
    ):
        yield cl


DEDUP_STAGE = stage_of("dedup")


def run_dedup(run_dir: Path, client, **dedup_settings) -> pa.Table:
    ctx = StageContext(
        config(**dedup_settings), RunFolder(str(run_dir)), client, progress=False, stage=DEDUP_STAGE
    )
    DEDUP_STAGE.run(ctx)
    return pq.read_table(run_dir / "dedup" / "decisions.parquet")


def by_key(table: pa.Table) -> dict[str, dict]:
    return {row["key"]: row for row in table.to_pylist()}


# --------------------------------------------------------------------------------------------
# The search engine against brute force


def brute_force(values: np.ndarray, r: int) -> set[tuple[int, int]]:
    d = np.bitwise_count(values[:, None] ^ values[None, :])
    i, j = np.triu_indices(values.size, 1)
    close = d[i, j] <= r
    return set(zip(values[i[close]].tolist(), values[j[close]].tolist(), strict=True))


def planted(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    base = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    near = []
    for v in base[: n // 2]:
        bits = rng.choice(64, size=int(rng.integers(0, r + 3)), replace=False)
        near.append(flip(int(v), *map(int, bits)))
    return hashindex.distinct(np.concatenate([base, np.array(near, dtype=np.uint64)]))


def subspace(rng: np.random.Generator, n: int) -> np.ndarray:
    """Hashes that differ only in 14 bits: long runs in every table, many true pairs."""
    bits = rng.choice(64, size=14, replace=False)
    raw = rng.integers(0, 2**14, size=n)
    values = np.full(n, rng.integers(0, 2**64, dtype=np.uint64), dtype=np.uint64)
    for j, bit in enumerate(bits):
        values ^= ((raw >> j) & 1).astype(np.uint64) << np.uint64(int(bit))
    return hashindex.distinct(values)


@pytest.mark.parametrize("r", [1, 2, 4, 6])
def test_search_finds_exactly_the_pairs_within_the_distance(r, monkeypatch):
    monkeypatch.setattr(hashindex, "CHUNK", 53)  # walk runs across many chunk borders
    rng = np.random.default_rng(r)
    for values in (planted(rng, 400, r), subspace(rng, 700)):
        truth = brute_force(values, r)
        assert truth, "the data must contain pairs"
        for blocks in range(r + 1, r + (4 if r <= 4 else 2)):
            plan = hashindex.SearchPlan(r, blocks)
            a, b, dist = hashindex.near_pairs(values, r, plan=plan, threads=2)
            found = list(zip(a.tolist(), b.tolist(), strict=True))
            assert len(found) == len(set(found)), "each pair is reported once"
            assert set(found) == truth
            assert (dist == np.bitwise_count(a ^ b)).all()
            # The sharded path: partitions by the top key bits, then pairs per partition.
            parts = [
                hashindex.partition_pairs(tables, hashes, plan)
                for _, tables, hashes in hashindex.band_records(values, plan, 4)
            ]
            sharded = {(int(x), int(y)) for p in parts for x, y in zip(p[0], p[1], strict=True)}
            assert sharded == truth


def test_plan_keys_tables_on_enough_bits_at_ten_million():
    plan = hashindex.plan_search(10_000_000, 4)
    # Not the naive r+1 = 5 bands of ~13 bits (about 1,200 hashes per bucket at 10M).
    assert plan.blocks > 5
    assert plan.min_key_bits >= 20
    assert plan.expected_candidates(10_000_000) / 10_000_000 < 100


def test_distinct_collapses_equal_hashes():
    values = np.array([5, 3, 5, 5, 2**64 - 1, 3], dtype=np.uint64)
    assert hashindex.distinct(values).tolist() == [3, 5, 2**64 - 1]


# --------------------------------------------------------------------------------------------
# The stage on hand-made shards

A = 0x8F3A_5C21_9E07_B4D6
FAR = 0x1234_5678_9ABC_DEF0  # 32 bits from A


def test_distance_exactly_max_distance_merges_and_one_more_does_not(tmp_path, client):
    run = write_run(
        tmp_path,
        {
            "00000": [
                sample("a", A, size=(800, 600)),
                sample("a_at_4", flip(A, 1, 17, 33, 60)),
                sample("far", FAR, size=(800, 600)),
                sample("far_at_5", flip(FAR, 2, 9, 30, 41, 63)),
            ]
        },
    )
    rows = by_key(run_dedup(run, client, max_distance=4))
    assert rows["a"]["kept"] and not rows["a_at_4"]["kept"]
    assert rows["a_at_4"]["reason"] == "near_duplicate"
    assert rows["a_at_4"]["duplicate_of"] == "a"
    assert rows["a_at_4"]["distance"] == 4
    assert rows["a_at_4"]["cluster"] == rows["a"]["cluster"]
    assert rows["far"]["kept"] and rows["far_at_5"]["kept"]
    assert rows["far"]["cluster"] != rows["far_at_5"]["cluster"]

    rows = by_key(run_dedup(run, client, max_distance=5))
    assert rows["far_at_5"]["reason"] == "near_duplicate"
    assert rows["far_at_5"]["distance"] == 5


def test_chain_forms_one_cluster_even_when_its_ends_are_far_apart(tmp_path, client):
    b = flip(A, 3, 20, 44)
    c = flip(b, 7, 51, 62)  # 6 bits from A
    run = write_run(
        tmp_path,
        {
            "00000": [sample("c", c, size=(300, 300)), sample("a", A, size=(1000, 800))],
            "00001": [sample("b", b, size=(500, 500)), sample("other", FAR)],
        },
    )
    table = run_dedup(run, client)
    rows = by_key(table)
    assert table["key"].to_pylist() == ["a", "b", "c", "other"]  # ordered by key
    assert {rows[k]["cluster"] for k in "abc"} == {0}  # the keeper's row
    assert rows["a"]["kept"]
    assert (rows["b"]["duplicate_of"], rows["b"]["distance"]) == ("a", 3)
    assert (rows["c"]["duplicate_of"], rows["c"]["distance"]) == ("a", 6)
    assert rows["other"]["kept"] and rows["other"]["cluster"] == 3


def test_keeper_is_most_pixels_then_best_face_score_then_smallest_key(tmp_path, client):
    group = [flip(A, i) for i in range(5)]
    run = write_run(
        tmp_path,
        {
            "00000": [
                sample("k1", group[0], size=(600, 600), scores=(0.99,)),
                sample("k2", group[1], size=(700, 700), scores=(0.91, 0.5)),
                sample("k3", group[2], size=(700, 700), scores=(0.95,)),
            ],
            "00001": [
                sample("k4", group[3], size=(700, 700), scores=(0.8, 0.95)),
                sample("k5", group[4], size=(700, 700), scores=()),
            ],
        },
    )
    rows = by_key(run_dedup(run, client))
    # k3 and k4 tie on pixels (700 x 700) and best score (0.95); the smaller key wins.
    assert [k for k, r in rows.items() if r["kept"]] == ["k3"]
    assert {r["duplicate_of"] for k, r in rows.items() if k != "k3"} == {"k3"}


def test_exact_and_near_duplicates_are_told_apart(tmp_path, client):
    same = hashlib.sha256(b"same bytes").hexdigest()
    run = write_run(
        tmp_path,
        {
            "00000": [
                sample("a_orig", A, sha=same, size=(900, 900)),
                sample("b_copy", A, sha=same, size=(900, 900)),
                sample("c_reencoded", A, size=(900, 900)),  # same pHash, other bytes
                sample("d_no_phash", None, sha=same, size=(900, 900)),  # joined by sha256 only
                sample("dropped_by_select", A, sha=same, size=(2000, 2000), kept=False),
            ]
        },
    )
    table = run_dedup(run, client)
    rows = by_key(table)
    assert "dropped_by_select" not in rows  # only what select kept enters dedup
    assert rows["a_orig"]["kept"]
    assert (rows["b_copy"]["reason"], rows["b_copy"]["distance"]) == ("exact_duplicate", 0)
    assert (rows["c_reencoded"]["reason"], rows["c_reencoded"]["distance"]) == ("near_duplicate", 0)
    no_phash = rows["d_no_phash"]
    assert (no_phash["reason"], no_phash["duplicate_of"], no_phash["distance"]) == (
        "exact_duplicate",
        "a_orig",
        None,
    )
    drops = pq.read_table(tmp_path / "dedup" / "drops.parquet")
    assert drops.schema.equals(DROP_COUNTS)
    assert sorted(drops.select(["reason", "count"]).to_pylist(), key=str) == [
        {"reason": "exact_duplicate", "count": 2},
        {"reason": "near_duplicate", "count": 1},
    ]
    run_json = RunFolder(str(tmp_path)).state
    assert run_json["stages"]["dedup"]["counts"]["exact_duplicate"] == 2

    # Only exact duplicates: the re-encoded copy stays.
    rows = by_key(run_dedup(run, client, near=False))
    assert rows["c_reencoded"]["kept"] and rows["b_copy"]["reason"] == "exact_duplicate"
    # Only near duplicates: byte-identical copies are near duplicates at distance 0.
    rows = by_key(run_dedup(run, client, exact=False))
    assert rows["b_copy"]["reason"] == "near_duplicate"
    # Neither: everything is kept.
    assert all(r["kept"] for r in run_dedup(run, client, exact=False, near=False).to_pylist())


def test_bad_inputs_name_the_file(tmp_path, client):
    run = write_run(tmp_path, {"00000": [sample("a", A)], "00001": [sample("a", flip(A, 1))]})
    # The decisions task reads every shard's samples: its error names both files.
    with pytest.raises(StageFailed, match=r"key 'a' appears in .*00000.* and .*00001"):
        run_dedup(run, client)
    (tmp_path / "faces" / "00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"faces/00001.parquet is missing"):
        run_dedup(run, client)


def test_rerun_is_skipped_unless_settings_or_inputs_change(tmp_path, client):
    run = write_run(tmp_path, {"00000": [sample("a", A), sample("b", flip(A, 1, 2, 3, 4, 5))]})
    assert all(run_dedup(run, client, max_distance=4)["kept"].to_pylist())
    decisions = tmp_path / "dedup" / "decisions.parquet"
    stamp = decisions.stat().st_mtime_ns
    run_dedup(run, client, max_distance=4)
    assert decisions.stat().st_mtime_ns == stamp
    assert run_dedup(run, client, max_distance=5)["kept"].to_pylist() == [True, False]
    write_shard(run, "00000", [sample("a", A), sample("b", flip(A, 1))])
    assert run_dedup(run, client, max_distance=4)["kept"].to_pylist() == [True, False]


# --------------------------------------------------------------------------------------------
# Same decisions whatever the workers, the shard order and the backend


def random_corpus(seed: int) -> list[dict]:
    """300 samples: planted groups at distances 0..max_distance + 2, chains, exact copies."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(60):
        base = int(rng.integers(0, 2**64, dtype=np.uint64))
        members = [base]
        for _ in range(int(rng.integers(0, 4))):
            parent = members[int(rng.integers(0, len(members)))]
            distance = int(rng.integers(0, 7))
            members.append(flip(parent, *map(int, rng.choice(64, distance, replace=False))))
        for m, value in enumerate(members):
            size = (int(rng.choice([400, 500])), int(rng.choice([400, 500])))
            score = (round(float(rng.choice([0.9, 0.95])), 2),)
            out.append(sample(f"{g:03d}{m}", value, size=size, scores=score))
            if rng.random() < 0.1:
                out.append(dict(out[-1], key=f"{g:03d}{m}x"))  # same bytes, same hash
    return out


def test_same_decisions_with_1_or_3_workers_any_shard_order_and_both_backends(tmp_path, client):
    samples = random_corpus(7)
    chunks = [samples[i::3] for i in range(3)]
    first = write_run(tmp_path / "a", {f"{i:05d}": chunk for i, chunk in enumerate(chunks)})
    second = write_run(
        tmp_path / "b", {f"{i:05d}": chunk for i, chunk in enumerate(reversed(chunks))}
    )
    third = write_run(tmp_path / "c", {f"{i:05d}": chunk for i, chunk in enumerate(chunks[1:])})
    write_shard(third, "00009", chunks[0])
    results = []
    # The stage alone, without the audit a run ends with: the same keys lie in different
    # shards here, which no real run has (a key starts with its raw shard's name).
    for run, workers, backend in ((first, 1, "memory"), (second, 3, "dask")):
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as own,
        ):
            results.append(run_dedup(run, own, backend=backend))
    results.append(run_dedup(third, client, backend="dask"))
    assert results[0].schema.equals(DEDUP)
    assert results[0].equals(results[1]) and results[0].equals(results[2])
    assert len(list((second / "dedup" / "pairs").glob("*.parquet"))) > 1  # dask steps ran
    assert not (first / "dedup" / "pairs").exists()

    # And they are right: clusters are the connected components of the pairs within 4.
    rows = results[0].to_pylist()
    values = np.array([s["phash"] for s in sorted(samples, key=lambda s: s["key"])], np.uint64)
    close = np.bitwise_count(values[:, None] ^ values[None, :]) <= 4
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(close, directed=False)
    clusters = [r["cluster"] for r in rows]
    for i in range(len(rows)):
        for j in range(len(rows)):
            assert (labels[i] == labels[j]) == (clusters[i] == clusters[j])
    assert sum(r["reason"] == "near_duplicate" for r in rows) > 10
    assert sum(r["reason"] == "exact_duplicate" for r in rows) > 3


# --------------------------------------------------------------------------------------------
# The demo corpus, and the evaluation-set guard on re-encoded copies of its images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from laionface.demo.corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("corpus"), seed=3, n_images=100)


def corpus_samples(corpus) -> tuple[list[dict], list[dict]]:
    """One sample per decodable corpus image (hashed as faces does), and the truth rows."""
    truth = corpus.read_truth().to_pylist()
    samples, rows = [], []
    for row in truth:
        if row["file"] is None or row["case"] in ("truncated", "not_an_image", "too_small"):
            continue
        data = (corpus.images_dir / row["file"]).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            phash = int(str(imagehash.phash(image)), 16)
            size = image.size
        key = f"{row['SAMPLE_ID']:09d}"
        samples.append(sample(key, phash, sha=hashlib.sha256(data).hexdigest(), size=size))
        rows.append(dict(row, key=key))
    return samples, rows


def test_demo_corpus_every_planted_group_found_and_distinct_images_never_merged(
    corpus, tmp_path, client
):
    samples, truth = corpus_samples(corpus)
    run = write_run(tmp_path, {"00000": samples[::2], "00001": samples[1::2]})
    rows = by_key(run_dedup(run, client))
    groups: dict[int, list[dict]] = {}
    for row in truth:
        if row["dup_group"] is not None:
            groups.setdefault(row["dup_group"], []).append(row)
    assert len(groups) >= 5 and {r["dup_kind"] for g in groups.values() for r in g} >= {
        "original",
        "exact",
        "reencode",
        "resize",
        "crop",
        "watermark",
    }
    cluster_of_group = {}
    for group, members in groups.items():
        decided = [rows[m["key"]] for m in members]
        assert len({d["cluster"] for d in decided}) == 1, f"group {group} split"
        keepers = [d for d in decided if d["kept"]]
        assert len(keepers) == 1, f"group {group}: {len(keepers)} keepers"
        for member, d in zip(members, decided, strict=True):
            if not d["kept"]:
                assert d["duplicate_of"] == keepers[0]["key"]
                keeper_sha = next(s["sha256"] for s in samples if s["key"] == keepers[0]["key"])
                same = next(s["sha256"] for s in samples if s["key"] == member["key"]) == keeper_sha
                assert d["reason"] == ("exact_duplicate" if same else "near_duplicate")
        cluster_of_group[group] = decided[0]["cluster"]
    assert len(set(cluster_of_group.values())) == len(groups), "two planted groups merged"
    singles = [rows[r["key"]] for r in truth if r["dup_group"] is None]
    assert all(d["kept"] for d in singles), "a distinct image was dropped"
    clusters = [d["cluster"] for d in singles] + list(cluster_of_group.values())
    assert len(set(clusters)) == len(clusters), "distinct images merged"


def reencode(data: bytes, quality: int, scale: float = 1.0) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if scale != 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        return out.getvalue()


def test_reference_guard_catches_reencoded_copies_of_corpus_images(corpus, tmp_path, client):
    samples, truth = corpus_samples(corpus)
    singles = [r for r in truth if r["dup_group"] is None and r["layout"] == "paste"]
    targets = singles[:4]
    refs = tmp_path / "eval_split"
    (refs / "nested").mkdir(parents=True)
    expected = {}
    for i, (row, quality, scale) in enumerate(
        zip(targets[:3], (60, 85, 75), (1.0, 0.9, 0.75), strict=True)
    ):
        data = (corpus.images_dir / row["file"]).read_bytes()
        path = refs / ("nested" if i == 2 else "") / f"eval_{i}.jpg"
        path.write_bytes(reencode(data, quality, scale))
        expected[row["key"]] = str(path)
    # A webdataset tar with a fourth copy, a caption, and an unrelated image.
    tar_path = tmp_path / "eval_00000.tar"
    unrelated = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    noise = io.BytesIO()
    unrelated.save(noise, "PNG")
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (
            ("000000007.jpg", reencode((corpus.images_dir / targets[3]["file"]).read_bytes(), 70)),
            ("000000007.txt", b"a caption"),
            ("000000008.png", noise.getvalue()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected[targets[3]["key"]] = f"{tar_path}#000000007.jpg"
    (refs / "broken.jpg").write_bytes(b"not an image")  # reported and skipped

    run = write_run(tmp_path / "run", {"00000": samples})
    rows = by_key(run_dedup(run, client, reference=[str(refs), str(tar_path)]))
    overlaps = {k: r for k, r in rows.items() if r["reason"] == "eval_overlap"}
    assert {k: r["duplicate_of"] for k, r in overlaps.items()} == expected
    assert all(0 <= r["distance"] <= 4 and r["cluster"] is None for r in overlaps.values())
    assert not any(r["kept"] for r in overlaps.values())

    # The same reference, precomputed with build_reference.
    ref_file = tmp_path / "eval.parquet"
    count = reference.build_reference([str(refs), str(tar_path)], str(ref_file))
    table = pq.read_table(ref_file)
    assert count == table.num_rows == 5 and table.schema.equals(REFERENCE_HASHES)
    rows = by_key(run_dedup(run, client, reference=str(ref_file)))
    assert {k for k, r in rows.items() if r["reason"] == "eval_overlap"} == set(expected)

    # An incremental build: an earlier dataset's folder as the reference. Its shard parquet has
    # the hashes (hex) and keys; the tar beside it is not hashed again, and its manifest.parquet
    # has no phash column.
    earlier = [s for s in samples if s["key"] in set(list(expected)[:2])]
    dataset = tmp_path / "earlier_dataset"
    dataset.mkdir()
    shard_rows = [{"key": f"old{s['key']}", "phash": f"{s['phash']:016x}"} for s in earlier]
    pq.write_table(
        pa.Table.from_pylist(shard_rows, schema=DATASET_SHARD), dataset / "00000.parquet"
    )
    shutil.copy(tar_path, dataset / "00000.tar")
    pq.write_table(pa.table({"key": ["old"], "shard": ["00000"]}), dataset / "manifest.parquet")
    rows = by_key(run_dedup(run, client, reference=str(dataset), backend="dask"))
    overlaps = {k: r for k, r in rows.items() if r["reason"] == "eval_overlap"}
    assert {k: (r["duplicate_of"], r["distance"]) for k, r in overlaps.items()} == {
        s["key"]: (f"old{s['key']}", 0) for s in earlier
    }


def test_reference_errors_name_the_entry(tmp_path, client):
    run = write_run(tmp_path / "run", {"00000": [sample("a", A)]})
    with pytest.raises(FileNotFoundError, match="dedup.reference: .*nowhere not found"):
        run_dedup(run, client, reference=str(tmp_path / "nowhere"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"phash": ["xyz"]}), bad)
    with pytest.raises(ValueError, match=r"bad.parquet: row 0: phash 'xyz' is not 16 hex"):
        run_dedup(run, client, reference=str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        run_dedup(run, client, reference=str(empty))
    shutil.rmtree(empty)
