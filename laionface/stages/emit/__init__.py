"""The emit stage (stage.py: the plan, the index files, dataset.json) and one dataset shard
(shard.py)."""

from laionface.stages.emit.stage import STAGE

__all__ = ["STAGE"]
