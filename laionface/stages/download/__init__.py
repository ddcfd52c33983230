"""The download stage and its helpers (the fetch guard)."""
