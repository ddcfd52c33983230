"""The dedup stage (stage.py) and its parts: the samples step, reference hashes, the
multi-index hash search (hashindex.py, search.py) and the decisions (decide.py)."""

from laionface.stages.dedup.stage import STAGE

__all__ = ["STAGE"]
