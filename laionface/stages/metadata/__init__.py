"""The metadata stage (stage.py) and its parts: inputs, the DuckDB filters, the shard steps and
the ID and URL lists."""

from laionface.stages.metadata.stage import STAGE

__all__ = ["STAGE"]
