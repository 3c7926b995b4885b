"""Benchmarks of the reformatters pipeline (run as modules, e.g. `python3 -m benchmarks.backfill`)."""
