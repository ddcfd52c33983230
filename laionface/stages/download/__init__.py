"""The download stage (stage.py) and its parts: one shard (shard.py) staged atomically
(staging.py), failure categories, the fetch guard and its politeness to each host (fetchguard.py,
hostgate.py), the pixel cap in front of img2dataset's resizer (pixelcap.py), glibc's heap under
Dask (heap.py), the isolation of a URL that kills its worker (isolation.py), the latest outcome
of each row (outcomes.py) and --retry-failed (retries.py)."""

from laionface.stages.download.stage import STAGE

__all__ = ["STAGE"]
