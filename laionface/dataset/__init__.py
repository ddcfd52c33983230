"""The published dataset: its contract, and verify, publish and export."""
