"""The paper's LaTeX tables and figures, exported from a grid of the store (`python -m paper export`).

It only reads, through store/queries.py, so a number in a table is the number the dashboard shows.
"""
