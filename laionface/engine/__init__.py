"""The engine: runs stages' per-shard functions on Dask, owns completion markers and run.json."""
