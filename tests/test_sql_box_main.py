"""The SQL box's child never runs the reader's main script again: under Streamlit __main__ is the dashboard's app.py,
and multiprocessing would re-run it as __mp_main__ in every statement's child (the whole dashboard, inside the
statement's time limit)."""

from __future__ import annotations

import subprocess
import sys

from fixtures_store import ROOT, build_synthetic_store

SCRIPT = """
import sys, types
from pathlib import Path
from store import queries
stub, marker, store = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
stub.write_text(f"from pathlib import Path\\nPath({str(marker)!r}).write_text('ran')\\n")
main = types.ModuleType("__main__")
main.__file__ = str(stub)  # as Streamlit's script runner installs it: a module whose file is the app
sys.modules["__main__"] = main
frame, truncated = queries.run_user_sql(store, "SELECT count(*) AS runs FROM runs")
print(int(frame.runs.iloc[0]))
"""


def test_the_box_child_does_not_run_the_main_script(tmp_path):
    store = build_synthetic_store(tmp_path / "gridrun.duckdb", runs=2, steps=64)
    stub, marker = tmp_path / "app.py", tmp_path / "ran.txt"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(stub), str(marker), str(store)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "2"
    assert not marker.exists(), "the child ran the parent's main script"
