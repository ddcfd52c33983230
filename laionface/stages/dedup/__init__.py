"""The dedup stage and its helpers (the multi-index hash search)."""
