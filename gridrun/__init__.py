"""gridrun: run an ablation grid (grids/*.yaml) on Ray actors into the DuckDB store, resumably.

spec expands and validates, schedule runs on Ray, driver records; only the driver (through store.writer) writes.
"""
