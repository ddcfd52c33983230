"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import urllib.request
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
    from laionface.demo.corpus import build_corpus

    return build_corpus(tmp_path_factory.getbasetemp() / "demo-corpus-seed0", seed=0)


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    path = SHARED / "faces"
    if not path.is_dir():
        pytest.fail(
            f"{path} is missing: the tests need the public-domain face photos in shared/faces"
        )
    return path


S3_BUCKET = "laion-face"


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto's) on 127.0.0.1, with an empty bucket S3_BUCKET."""
    import boto3
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=S3_BUCKET)
    # In this process, the same setting FSSPEC_S3_ENDPOINT_URL gives a new one.
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint, client
    s3fs.S3FileSystem.clear_instance_cache()
    # moto keeps its buckets per process, not per server: the next test starts empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    server.stop()
