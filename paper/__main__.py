"""`python -m paper export [--store PATH] [--grid NAME] [--out DIR] [--include-stale]` writes the paper's tables and
figures; `python -m paper pdf [--out DIR]` builds paper/main.tex with them where pdflatex exists. Never writes the
store.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from paper.export import ExportError, export
from store.queries import DEFAULT_STORE, StoreError

PAPER_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PAPER_DIR / "generated"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m paper", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exporting = commands.add_parser("export", help="write tables.tex, ablations.tex, sweeps.tex, profile.tex, "
                                    "figures.tex and the figures (PDF + PNG), and speculative.tex / quantization.tex "
                                    "where the grid has those experiments")
    exporting.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"default {DEFAULT_STORE}")
    exporting.add_argument("--grid", help="grid name (default: 'paper', or the store's only grid)")
    exporting.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default paper/generated)")
    exporting.add_argument("--include-stale", action="store_true",
                           help="use runs made by other evaluation code too (marked with a dagger)")
    building = commands.add_parser("pdf", help="build paper/main.tex into DIR/main.pdf with pdflatex")
    building.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the exported folder (default paper/generated)")
    return parser.parse_args(argv)


def build_pdf(out: Path) -> Path:
    """pdflatex twice (figure and table references) on main.tex, reading the generated files from `out`."""
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        raise ExportError("pdflatex is not installed: install TeX Live (bash scripts/ci-system-deps.sh) or build "
                          "paper/main.tex elsewhere")
    out = out.resolve()
    missing = [name for name in ("tables.tex", "figures.tex") if not (out / name).is_file()]
    if missing:
        raise ExportError(f"{out} has no {', '.join(missing)}: run python -m paper export --out {out} first")
    with tempfile.TemporaryDirectory() as build:
        command = [pdflatex, "-interaction=nonstopmode", "-halt-on-error", f"-output-directory={build}",
                   rf"\def\gendir{{{out}}}\input{{{PAPER_DIR / 'main.tex'}}}"]
        for _ in range(2):
            result = subprocess.run(command, cwd=PAPER_DIR, capture_output=True, text=True)
            if result.returncode != 0:
                raise ExportError(f"pdflatex failed on paper/main.tex:\n{result.stdout[-3000:]}")
        target = out / "main.pdf"
        shutil.copyfile(Path(build) / "main.pdf", target)
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "export":
            for path in export(args.store, args.grid, args.out, args.include_stale):
                print(path)
        else:
            print(build_pdf(args.out))
    except (ExportError, StoreError) as error:
        print(f"paper {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
