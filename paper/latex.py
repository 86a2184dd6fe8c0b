"""LaTeX text for the paper's tables: number formatting (mean ± std with n), escaping, booktabs tables.

Pure string building: it never queries the store, and refuses a missing number rather than print a placeholder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
KNOB_NAMES = {"compress_every": "R", "max_drop": "max_drop", "cap_mode": "cap_mode"}


class MissingNumber(ValueError):
    """A table cell has no value (NaN or None): the export stops rather than print a placeholder."""


def escape(text: object) -> str:
    return "".join(SPECIALS.get(char, char) for char in str(text))


def number(value: float | None, digits: int, *, signed: bool = False, what: str = "value") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise MissingNumber(f"{what} is missing")
    return f"{value:{'+' if signed else ''}.{digits}f}"


def mean_std(mean: float, std: float | None, n: int, digits: int, *, signed: bool = False,
             what: str = "value") -> str:
    """`$mean \\pm std$` when there are repeats (n > 1), else `$mean$`."""
    text = number(mean, digits, signed=signed, what=what)
    if n > 1:
        text += r" \pm " + number(std, digits, what=f"std of {what}")
    return f"${text}$"


def ordinal(number: int) -> str:
    """'32nd', '1st', '11th'."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def knob(name: str, value: object) -> str:
    """`$R{=}64$`, `slack${=}$16`: how a knob and its value read in a row label."""
    short = KNOB_NAMES.get(name, name)
    if short == "R":
        return f"$R{{=}}{value}$"
    return f"{escape(short)}{{=}}{escape(value)}"


@dataclass
class Table:
    """A booktabs table: a header, then panels (an optional heading row and body rows), a caption and a label."""

    columns: list[tuple[str, str]]  # (header, alignment)
    caption: str
    label: str
    panels: list[tuple[str | None, list[list[str]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # LaTeX comments after each row, e.g. the group hash

    def add_panel(self, heading: str | None, rows: list[list[str]], notes: list[str] | None = None) -> None:
        for row in rows:
            if len(row) != len(self.columns):
                raise ValueError(f"row {row} has {len(row)} cells for {len(self.columns)} columns")
        self.panels.append((heading, rows))
        self.notes.extend(notes or [""] * len(rows))

    def render(self) -> str:
        align = "".join(a for _, a in self.columns)
        # \small and narrower column gaps: the ladder's labels carry every knob value and must fit a column of text.
        lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
                 rf"\caption{{{self.caption}}}", rf"\label{{{self.label}}}", rf"\begin{{tabular}}{{{align}}}",
                 r"\toprule", " & ".join(h for h, _ in self.columns) + r" \\"]
        notes = iter(self.notes)
        for heading, rows in self.panels:
            lines.append(r"\midrule")
            if heading:
                lines.append(rf"\multicolumn{{{len(self.columns)}}}{{l}}{{{heading}}} \\")
            for row in rows:
                note = next(notes)
                lines.append(" & ".join(self._cell(i, cell) for i, cell in enumerate(row)) + r" \\"
                             + (f" % {note}" if note else ""))
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
        return "\n".join(lines)

    def _cell(self, column: int, text: str) -> str:
        """A paragraph column's cell set ragged-right (justified, a narrow column spreads a long label's words
        apart); not the last column, where \\raggedright would take the row's \\\\ (that needs the array package)."""
        wraps = self.columns[column][1].startswith("p{") and column < len(self.columns) - 1
        return rf"\raggedright {text}" if wraps and text else text
