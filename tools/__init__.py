"""Runnable tools, each run from the repository root as `python -m tools.NAME` (bench, bench_sharding,
consolidate, export, plot, study)."""
