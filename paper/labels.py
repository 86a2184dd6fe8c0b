"""How a setting reads in the paper: the method's name, row labels with the knobs that apply, the ablation ladder's
rungs. Pure: rows in, LaTeX text out; it never queries the store."""

from __future__ import annotations

from paper.latex import escape, knob

METHOD_ORDER = {"recompute": 0, "dense": 1, "streaming": 2}
LADDER_RUNGS = ("Strict", "Lazy", "+ slack", "+ slack + max\\_drop")
STALE_MARK = r"$^\dagger$"


def method_name(row) -> str:
    if row.method == "streaming":
        return "Strict" if row.compress_every == 1 else "Lazy"
    return {"recompute": "Recompute", "dense": "Dense"}.get(row.method, escape(row.method))


def row_label(row, knobs: list[str]) -> str:
    """'Lazy ($R{=}64$, slack{=}16)': the method, then the given knobs that apply to it."""
    shown = [k for k in knobs if row.method == "streaming" or (row.method == "recompute" and k == "cap")]
    if row.method == "recompute" and "cap" not in shown:
        shown.append("cap")
    parts = ", ".join(knob(k, getattr(row, k)) for k in shown)
    stale = STALE_MARK if row.stale else ""
    return f"{method_name(row)}{stale}" + (f" ({parts})" if parts else "")


def ladder_rung(row) -> int:
    """The ablation ladder: strict -> lazy -> + slack -> + slack + max_drop; -1 for anything else."""
    if row.method != "streaming":
        return -1
    if row.compress_every == 1:
        return 0 if row.slack == 0 and row.max_drop == 0 else -1
    if row.slack == 0:
        return 1 if row.max_drop == 0 else -1
    return 2 if row.max_drop == 0 else 3


def ladder_label(row) -> str:
    """'+ slack ($R{=}64$, slack{=}16)': the rung, then the knob values that make it."""
    if row.rung < 0:
        return row_label(row, ["compress_every", "slack", "max_drop"])
    knobs = ["compress_every", *[k for k in ("slack", "max_drop") if getattr(row, k)]]
    stale = STALE_MARK if row.stale else ""
    return f"{LADDER_RUNGS[row.rung]}{stale} ({', '.join(knob(k, getattr(row, k)) for k in knobs)})"
