"""glibc's heap under Dask's MALLOC_TRIM_THRESHOLD_, seen through page faults in real processes.

A process started with the variable maps and faults in every large buffer anew (what made a
download shard ~20% slower in a Dask worker); inside `heap.roomy_heap()` the buffers are reused,
and after it the process has the heap it started with. A process that only set the variable
later (glibc never read it) is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Page faults while allocating, filling and freeing a 1 MiB buffer 200 times: outside the roomy
# heap, inside it, and after it.
SCRIPT = """
import json, os, resource, sys
from laionface.stages.download import heap

def faults(rounds=200, size=1 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        block = b"x" * size  # written: every page is touched
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

if len(sys.argv) > 1:
    os.environ["MALLOC_TRIM_THRESHOLD_"] = sys.argv[1]  # too late for glibc to read it
faults(5)
outside = faults()
with heap.roomy_heap():
    faults(5)
    inside = faults()
after = faults()
print(json.dumps({"outside": outside, "inside": inside, "after": after}))
"""

# 200 fresh mappings of 256 pages each fault ~51,000 times; reused memory hardly at all.
FRESH_MAPPINGS = 200 * 256 // 2


def _faults(environ: dict[str, str], *args: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        cwd=REPO,
        env={**env, **environ},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_roomy_heap_reuses_buffers_where_dask_trims_and_restores_after():
    trimmed = _faults({"MALLOC_TRIM_THRESHOLD_": "65536"})
    assert trimmed["outside"] > FRESH_MAPPINGS, trimmed
    assert trimmed["inside"] < trimmed["outside"] / 20, trimmed
    assert trimmed["after"] > FRESH_MAPPINGS, trimmed  # the heap it started with


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_variable_set_after_start_changes_nothing():
    untouched = _faults({}, "65536")
    assert untouched["outside"] < FRESH_MAPPINGS / 20, untouched
    assert untouched["after"] < FRESH_MAPPINGS / 20, untouched
