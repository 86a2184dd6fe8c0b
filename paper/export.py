"""`python -m paper export`: the paper's LaTeX tables and figures from one grid of the store, in that order: check
that every run the paper needs is done (paper/gather.py), read every number (gather.py, through store/queries.py),
render the tables (tables.py) and the figures (figures.py), then write. Orchestration only: if anything is missing it
fails with the list and writes nothing, never a placeholder."""

from __future__ import annotations

from pathlib import Path

from paper import figures, gather, tables
from paper.gather import ExportError  # noqa: F401  (the CLI's error, raised here)
from paper.latex import MissingNumber
from store import queries
from store.opening import verify_segments

# What an export writes only for some grids: removed from the output folder when this grid has none, so that a folder
# exported from another grid before never mixes its tables into this one's.
OPTIONAL_OUTPUTS = ("layout.tex", "speculative.tex", "quantization.tex", "quantization.pdf", "quantization.png",
                    "retrieval.tex", "needle.pdf", "needle.png")


def export(store: Path, grid: str | None, out: Path, include_stale: bool = False) -> list[Path]:
    """Write tables.tex, ablations.tex, sweeps.tex, profile.tex, figures.tex and the figures (PDF + PNG) to `out`, and
    layout.tex / speculative.tex / quantization.tex (+ figure) / retrieval.tex (+ needle figure) where the grid has
    those experiments."""
    verify_segments(store)  # no published number from a segment other than its writer recorded (StoreError)
    with queries.connect(store) as con:
        grid = gather.resolve_grid(con, grid, store)
        gather.check_complete(con, grid, include_stale)
        gathered = gather.gather(con, grid, include_stale)
        quant = gather.gather_quantization(con, grid, include_stale)
        cells = gather.gather_retrieval(con, grid, include_stale)
    try:
        texts = {
            "tables.tex": tables.main_table(gathered),
            "ablations.tex": tables.ladder_table(gathered),
            "sweeps.tex": tables.sweeps_table(gathered),
            "profile.tex": tables.profile_table(gathered),
            "findings.tex": tables.findings_text(gathered),
        }
        if gathered.storage is not None:
            texts["layout.tex"] = tables.layout_table(gathered)
        if gathered.speculation is not None:
            texts["speculative.tex"] = tables.speculative_table(gathered)
        if quant is not None:
            texts["quantization.tex"] = tables.quantization_table(*quant)
        if cells is not None:
            texts["retrieval.tex"] = tables.retrieval_table(cells)
    except MissingNumber as missing:
        raise ExportError(f"grid {grid}: {missing}; nothing was written") from None
    out.mkdir(parents=True, exist_ok=True)
    # First, before anything is written: an export that fails halfway never leaves another grid's tables beside these.
    planned = {*texts, *(("quantization.pdf", "quantization.png") if quant is not None else ()),
               *(("needle.pdf", "needle.png") if cells is not None else ())}
    for name in OPTIONAL_OUTPUTS:
        if name not in planned:
            (out / name).unlink(missing_ok=True)
    written = []
    for name, text in texts.items():
        (out / name).write_text(text)
        written.append(out / name)
    written += figures.write_all(gathered, out)
    if quant is not None:
        written += figures.save(figures.quantization(quant[0]), out / "quantization")
    if cells is not None:
        written += figures.save(figures.needle(cells), out / "needle")
    return written
