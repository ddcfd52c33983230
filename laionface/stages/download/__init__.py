"""The download stage (stage.py) and its parts: one shard (shard.py), failure categories,
the fetch guard, the latest outcome of each row (outcomes.py) and --retry-failed (retries.py)."""

from laionface.stages.download.stage import STAGE

__all__ = ["STAGE"]
