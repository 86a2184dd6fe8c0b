"""`python -m dashboard [--store PATH] [--port N]`: serve the dashboard with `streamlit run` on 127.0.0.1.

A thin wrapper: it sets the address, port and privacy options, then hands over to Streamlit. It never reads the store.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from store.queries import DEFAULT_STORE

APP = Path(__file__).resolve().parent / "app.py"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE,
                        help=f"the store to read (default {DEFAULT_STORE})")
    parser.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    return parser.parse_args(argv)


def streamlit_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", args.address, "--server.port", str(args.port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",
        "--", "--store", str(args.store.resolve()),
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not 0 < args.port < 65536:
        raise SystemExit(f"--port {args.port}: a port is 1-65535")
    project = str(APP.parent.parent)
    # The app imports dashboard/ and store/ as packages: the project root must be on its path wherever we start.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    print(f"dashboard: http://{args.address}:{args.port}  (store {args.store.resolve()})", flush=True)
    os.execvpe(sys.executable, streamlit_command(args), env)


if __name__ == "__main__":
    main()
