"""The metadata stage and its helpers (ID and URL lists)."""
