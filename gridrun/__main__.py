"""`python -m gridrun GRID.yaml [...]` runs a grid into the store; `python -m gridrun status GRID.yaml` counts its runs;
`python -m gridrun migrate --store PATH` upgrades an older store in place.

Command-line parsing and messages only: validation lives in gridrun.spec, running in gridrun.driver.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .interrupt import EXIT_INTERRUPTED, hold_signals, stop_on_signals, stopping

if __name__ == "__main__":
    hold_signals()  # a signal during the imports below is noted, then stops the command as main starts

from store.opening import verify_segments
from store.queries import (
    StoreError,  # the writer's StoreError too: a reader's (store/opening.py verify_segments) is this one
)
from store.writer import DEFAULT_STORE, StoreWriter, check_writable, read_runs

from .driver import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    GridRunner,
    decide,
    dry_run,
    resume_command,
    write_equivalences,
)
from .preflight import check_runnable
from .schedule import ScheduleError
from .spec import Grid, GridError, load_grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gridrun",
        description="Run an ablation grid on Ray actors into a DuckDB store, resumably. "
                    "`python -m gridrun status GRID.yaml` counts done / pending / failed / stale runs per experiment.",
    )
    parser.add_argument("grid", type=Path, help="grid file, e.g. grids/paper.yaml")
    _common(parser)
    parser.add_argument("--dry-run", action="store_true", help="list every run and whether it would run; do nothing")
    parser.add_argument("--force", action="store_true", help="rerun runs already done (earlier results are kept as "
                        "superseded)")
    parser.add_argument("--address", default=None, help="Ray cluster to join: auto or ray://HOST:PORT (default: "
                        "start a local Ray and stop it at the end)")
    parser.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU, else one per CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per actor (default: the CPUs "
                        "shared out between the CPU actors)")
    parser.add_argument("--retries", type=int, default=1, help="times a run is retried when its worker dies "
                        "(default 1)")
    return parser


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gridrun status",
                                     description="Done / pending / failed / stale runs per experiment of a grid.")
    parser.add_argument("grid", type=Path)
    _common(parser)
    return parser


def build_migrate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gridrun migrate", description="Upgrade a store written by an "
                                     "older gridrun in place (every row kept).")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"DuckDB store (default {DEFAULT_STORE})")
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"DuckDB store (default {DEFAULT_STORE})")
    parser.add_argument("--only", action="append", default=[], metavar="EXPERIMENT",
                        help="only the runs of this experiment (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a knob in every run, e.g. --set max_tokens=256 (repeatable)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only the runs with this knob value, e.g. --where protocol=stepwise (repeatable: all of "
                        "them)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Ctrl-C and SIGTERM stop every command cleanly from its first line on, also in a process that started with SIGINT
    # ignored (a background job): the first raises KeyboardInterrupt, later ones are noted while it stops.
    try:
        stop_on_signals()
        if argv[:1] == ["status"]:
            return status(build_status_parser().parse_args(argv[1:]))
        if argv[:1] == ["migrate"]:
            return migrate(build_migrate_parser().parse_args(argv[1:]))
        return run(build_parser().parse_args(argv), argv)
    except (GridError, StoreError, ScheduleError) as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before a grid's runs started (run() reports those itself), or in status / migrate
        stopping()
        again = "" if argv[:1] in (["status"], ["migrate"]) else f" Resume with:\n  {resume_command(argv)}"
        print(f"\ninterrupted before any run started; nothing was recorded.{again}", flush=True)
        return EXIT_INTERRUPTED


def _selected(whole: Grid, args: argparse.Namespace) -> Grid:
    """The runs of --only's experiments, then of --where's knob values (the whole grid without either)."""
    grid = whole.only(args.only) if args.only else whole
    return grid.where(args.where) if args.where else grid


def one_line(message: str, limit: int = 2000) -> str:
    """An error as one line of bounded length (YAML and DuckDB messages span lines; a hostile value can be long)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run(args: argparse.Namespace, argv: list[str]) -> int:
    whole = load_grid(args.grid, args.set)
    grid = _selected(whole, args)
    from streaming_llm.environment import code_version  # imports torch: after the grid is known to be valid

    if args.dry_run:
        return dry_run(grid, args.store, code_version(), args.force)
    _check_options(args)
    # Everything a run would load is looked for now, before Ray starts or the store is opened for writing; the store
    # is only read here (a damaged or foreign one is refused, untouched).
    stored = read_runs(args.store, [run.run_hash for run in grid.runs])
    check_writable(args.store)
    to_run = [d.run for d in decide(grid.runs, stored, code_version(), args.force) if d.action == "run"]
    check_runnable(to_run, args.grid, local=args.address is None)
    runner = GridRunner(grid, args.store, code_version(), force=args.force, address=args.address,
                        workers=args.workers, threads=args.threads, retries=args.retries, registered=whole)
    resume = resume_command(argv)
    try:
        report = runner.run()
    except KeyboardInterrupt:  # before any run started (opening the store, starting Ray): nothing to keep
        stopping()
        print(f"\ninterrupted before any run started; nothing was recorded. Resume with:\n  {resume}", flush=True)
        return EXIT_INTERRUPTED
    if report.interrupted:
        ray_state = "Ray shut down" if args.address is None else "its actors stopped, the cluster left running"
        print(f"\ninterrupted: {report.done} run(s) finished and stored in {args.store}, runs in progress dropped, "
              f"{ray_state}. Resume with:\n  {resume}", flush=True)
        return EXIT_INTERRUPTED
    overhead = 1 - report.run_seconds / (report.wall_s * report.workers) if report.workers and report.wall_s else 0.0
    print(f"grid {grid.name}: {report.skipped + report.done}/{report.total} done ({report.skipped} skipped, "
          f"{report.done} run now), {len(report.failed)} failed, wall {report.wall_s:.1f} s, "
          f"store {report.store_seconds:.2f} s, workers idle or starting {100 * overhead:.1f}% of the time")
    if report.stale:
        print(f"{len(report.stale)} run(s) were made by workers running other evaluation code than this checkout "
              "(stored as stale): install the same code on every node, then rerun")
    if report.failed:
        print(f"failed runs keep their error text in {args.store} (SELECT run_hash, error FROM runs WHERE status = "
              f"'failed'); rerun them with:\n  {resume}")
    return EXIT_OK if report.complete else EXIT_INCOMPLETE


def status(args: argparse.Namespace) -> int:
    whole = load_grid(args.grid, args.set)
    grid = _selected(whole, args)
    from streaming_llm.environment import code_version

    stored = read_runs(args.store, [run.run_hash for run in grid.runs])
    if stored:  # a run counts as done only when its segment is as its writer recorded it (sizes and digests)
        verify_segments(args.store, [run_hash for run_hash, run in stored.items() if run.status == "done"])
    decisions = {d.run.run_hash: d.reason for d in decide(grid.runs, stored, code_version(), force=False)}
    names = [name for name in grid.experiments if any(name in run.experiments for run in grid.runs)]
    width = max(len("(distinct runs)"), *(len(name) for name in names))
    print(f"grid {grid.name} in {args.store}: done = by the current evaluation code {code_version()}")
    print(f"{'experiment':{width}}  {'runs':>5} {'done':>5} {'pending':>7} {'failed':>6} {'stale':>5}")
    rows = [(name, [decisions[r.run_hash] for r in grid.runs if name in r.experiments]) for name in names]
    rows.append(("(distinct runs)", list(decisions.values())))
    for name, reasons in rows:
        print(f"{name:{width}}  {len(reasons):5d} {reasons.count('done'):5d} {reasons.count('pending'):7d} "
              f"{reasons.count('failed'):6d} {reasons.count('stale'):5d}")
    write_equivalences(grid, sys.stdout)
    return EXIT_OK


def migrate(args: argparse.Namespace) -> int:
    if not args.store.exists():
        raise StoreError(f"--store {args.store}: no such file")
    from streaming_llm.environment import code_version

    with StoreWriter(args.store, code_version()):
        pass  # opening creates what the schema lacks and publishes the store at the current version
    print(f"{args.store}: store schema up to date; every row kept")
    return EXIT_OK


def _check_options(args: argparse.Namespace) -> None:
    for option, value, low in (("--workers", args.workers, 1), ("--threads", args.threads, 1),
                               ("--retries", args.retries, 0)):
        if value is not None and not low <= value <= 4096:
            raise GridError(f"{option} {value}: give a number from {low} to 4096")


if __name__ == "__main__":
    sys.exit(main())
