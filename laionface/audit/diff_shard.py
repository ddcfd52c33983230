"""`laionface diff`'s work on one raw shard (audit.diff maps it, on threads or the cluster):
each image's fate in each run and the keys kept by one run only."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from laionface.audit.read import read_columns
from laionface.io import keyed, storage
from laionface.layout import RunLayout, key_prefix

KEPT, ABSENT = "kept", "(absent)"
# Example keys kept by one run only, per side.
EXAMPLES = 10
DIFF_KEYS = pa.schema(
    [
        ("key", pa.string()),
        ("SAMPLE_ID", pa.int64()),
        ("kept_by", pa.string()),  # "A" or "B"
        ("fate_a", pa.string()),  # kept, select/REASON, dedup/REASON or (absent)
        ("fate_b", pa.string()),
    ]
)
_FATES = pa.schema([("key", pa.string()), ("SAMPLE_ID", pa.int64()), ("fate", pa.string())])


def shard_fates(run_url: str, raw: str, decided: bool) -> pa.Table:
    """(key, SAMPLE_ID, fate) of every image of one raw shard that select decided: "kept" after
    the last of select and dedup, else "select/REASON" or "dedup/REASON"."""
    layout = RunLayout(run_url)
    url = layout.select(raw)
    if not storage.exists(url):
        return _FATES.empty_table()
    select = read_columns(url, ["key", "SAMPLE_ID", "kept", "reason"])
    kept = pc.fill_null(select["kept"], False)
    fate = pc.if_else(
        kept,
        KEPT,
        pc.binary_join_element_wise("select", pc.fill_null(select["reason"], "unknown"), "/"),
    )
    if decided:
        decisions = keyed.read_prefix(
            layout.dedup_decisions, key_prefix(raw), ["key", "kept", "reason"]
        )
        dropped = decisions.filter(pc.invert(pc.fill_null(decisions["kept"], False)))
        at = pc.index_in(select["key"], value_set=dropped["key"].combine_chunks())
        reasons = pc.take(pc.fill_null(dropped["reason"], "unknown"), at)
        fate = pc.if_else(pc.is_valid(at), pc.binary_join_element_wise("dedup", reasons, "/"), fate)
    return pa.table(
        {"key": select["key"], "SAMPLE_ID": select["SAMPLE_ID"], "fate": fate}, schema=_FATES
    )


def diff_shard(
    *, run_a: str, run_b: str, raw: str, decided_a: bool, decided_b: bool, rows: bool
) -> dict[str, Any]:
    """One raw shard's keys kept by one run only: counts by the other run's fate, the first
    EXAMPLES keys of each side, and (`rows`) all of them as a DIFF_KEYS table."""
    a = shard_fates(run_a, raw, decided_a)
    b = shard_fates(run_b, raw, decided_b)
    joined = a.join(b, "key", join_type="full outer", left_suffix="_a", right_suffix="_b")
    fate_a = pc.fill_null(joined["fate_a"], ABSENT)
    fate_b = pc.fill_null(joined["fate_b"], ABSENT)
    a_only = pc.and_(pc.equal(fate_a, KEPT), pc.not_equal(fate_b, KEPT))
    b_only = pc.and_(pc.equal(fate_b, KEPT), pc.not_equal(fate_a, KEPT))
    table = pa.table(
        {
            "key": joined["key"],
            "SAMPLE_ID": pc.coalesce(joined["SAMPLE_ID_a"], joined["SAMPLE_ID_b"]),
            "kept_by": pc.if_else(a_only, "A", "B"),
            "fate_a": fate_a,
            "fate_b": fate_b,
        },
        schema=DIFF_KEYS,
    )
    table = table.filter(pc.or_(a_only, b_only)).sort_by("key")
    mine = {side: table.filter(pc.equal(table["kept_by"], side)) for side in ("A", "B")}
    other = {"A": "fate_b", "B": "fate_a"}
    return {
        "counts": {side: t.num_rows for side, t in mine.items()},
        "by_fate": {side: dict(Counter(t[other[side]].to_pylist())) for side, t in mine.items()},
        "examples": {side: t["key"].slice(0, EXAMPLES).to_pylist() for side, t in mine.items()},
        "table": table if rows else None,
    }
