"""The gridrun dashboard: browse a store's grids, runs and per-token curves in Streamlit + Altair.

It only reads, through store/queries.py; `python -m dashboard` serves it on 127.0.0.1 with usage statistics off.
"""
