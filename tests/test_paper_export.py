"""`python -m paper export` on a store filled by gridrun (grids/smoke.yaml plus the paper experiments it lacks): every
file is written, each .tex compiles with pdflatex in a minimal document, every number equals the store's (recomputed
here by plain SQL), and missing or stale runs make the export fail with the list of what is missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from fixtures_store import PAPER_GRID, ROOT, copy_store, smoke_store

from paper.export import export
from paper.gather import ExportError
from paper.tables import AS_EAGER, COMPILED_NOTE, STORAGE_NOTE, quantization_table

TEX_FILES = ("tables.tex", "ablations.tex", "sweeps.tex", "profile.tex", "speculative.tex", "figures.tex",
             "quantization.tex", "findings.tex", "retrieval.tex", "layout.tex")
FIGURES = ("kv_len", "tradeoff", "nll_compactions", "long_stream", "quantization", "needle")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def require(tool: str) -> str:
    """The tool's path; in CI (CI=true) a missing tool fails the test, elsewhere it skips it."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed: run bash scripts/ci-system-deps.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return smoke_store(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper") / "generated"
    export(store, PAPER_GRID, out)
    return out


def rows(tex: Path) -> dict[str, list[str]]:
    """Body rows of a generated table, by the setting (setting hash) each row's trailing comment names; a row of
    equivalent settings (one set of runs) names them all, and is returned under each."""
    found = {}
    for line in tex.read_text().splitlines():
        if " % setting " in line:
            body, settings = line.split(r" \\ % setting ")
            cells = [cell.removeprefix("\\raggedright ") for cell in body.split(" & ")]  # a label column's wrap
            for setting in settings.strip().split(", "):
                found.setdefault(setting, cells)
    return found


def check_merged(found: dict[str, list[str]], expected: dict[str, dict]) -> None:
    """Configurations that share a run are one row, whose label says so; no run's numbers show in two rows."""
    by_row: dict[int, set[str]] = {}
    for group, cells in found.items():
        by_row.setdefault(id(cells), set()).add(group)
    runs = [{expected[group]["run_group"] for group in groups} for groups in by_row.values()]
    assert all(len(run) == 1 for run in runs), runs
    assert len({run.pop() for run in runs}) == len(runs), "one computation printed in two rows"
    for groups in by_row.values():
        label = found[next(iter(groups))][0]
        assert (len(groups) > 1) == (r"$\equiv$" in label), label


def numbers(cell: str) -> list[float]:
    return [float(match) for match in NUMBER.findall(cell.replace(r"\times", ""))]


def close(cell: str, expected: list[float], digits: int) -> bool:
    found = numbers(cell)
    return len(found) == len(expected) and all(abs(f - e) <= 0.5 * 10 ** -digits + 1e-9
                                               for f, e in zip(found, expected, strict=True))


def expected_groups(store: Path, experiment: str) -> dict[str, dict]:
    """Per setting of `experiment` (its runs there are stepwise, on one text sample): mean, std and n of the done runs
    of its configurations there (all their repeats in the grid; not its runs of other lengths or protocols in other
    experiments), and speedup / ΔPPL vs the grid's eager recompute runs of the same model and cap (the tables print
    eager settings; a compiled one is timed against the compiled recompute: storage_groups), straight from the
    tables."""
    with duckdb.connect(str(store), read_only=True) as con:
        frame = con.execute("""
            WITH members AS (SELECT DISTINCT config_hash, config_group_hash, setting_hash, run_hash, model, cap,
                                 method, sample, compile FROM configurations WHERE grid = $grid),
            done AS (SELECT m.config_group_hash, m.setting_hash, m.model, m.cap, m.method, m.sample, m.compile,
                         r.group_hash AS run_group,
                         r.tpot_ms_mean, r.ppl, r.peak_memory_bytes, r.compaction_count
                     FROM members m JOIN runs r USING (run_hash) WHERE r.status = 'done'),
            base AS (SELECT model, cap, avg(tpot_ms_mean) AS base_tpot, avg(ppl) AS base_ppl FROM done
                     WHERE method = 'recompute' AND compile = 'none' GROUP BY ALL)
            SELECT setting_hash, any_value(method) AS method, count(*) AS n, count(DISTINCT sample) AS n_samples,
                any_value(run_group) AS run_group,
                avg(tpot_ms_mean) AS tpot, stddev_samp(tpot_ms_mean) AS tpot_std, avg(ppl) AS ppl,
                avg(peak_memory_bytes) / 1048576 AS mem,
                stddev_samp(peak_memory_bytes) / 1048576 AS mem_std, avg(compaction_count) AS compactions,
                any_value(base_tpot) / avg(tpot_ms_mean) AS speedup, 100 * (avg(ppl) / any_value(base_ppl) - 1) AS dppl
            FROM done LEFT JOIN base USING (model, cap)
            WHERE config_group_hash IN (SELECT config_group_hash FROM configurations
                                        WHERE grid = $grid AND experiment = $experiment)
            GROUP BY setting_hash
        """, {"grid": PAPER_GRID, "experiment": experiment}).df()
    return {row.setting_hash: row._asdict() for row in frame.itertuples()}


def mean_std(group: dict, name: str) -> list[float]:
    return [group[name], group[f"{name}_std"]] if group["n"] > 1 else [group[name]]


def check_delta(cell: str, group: dict) -> bool:
    """One text sample: the paired ΔPPL is that sample's, and one sample of one agrees with its sign."""
    return close(cell, [group["dppl"], 1, 1], 2)


def test_export_writes_every_table_and_figure(exported):
    for name in TEX_FILES:
        assert (exported / name).read_text().strip(), name
    for figure in FIGURES:
        assert (exported / f"{figure}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (exported / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", TEX_FILES)
def test_each_tex_compiles_in_a_minimal_document(exported, tmp_path, name):
    pdflatex = require("pdflatex")
    document = tmp_path / "minimal.tex"
    document.write_text("\n".join([
        r"\documentclass{article}", r"\usepackage{booktabs}", r"\usepackage{graphicx}",
        rf"\graphicspath{{{{{exported}/}}}}", r"\begin{document}", rf"\input{{{exported / name}}}", r"\end{document}",
    ]))
    result = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", document.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "minimal.pdf").stat().st_size > 1000


def test_main_table_numbers_equal_the_store(exported, store):
    expected = expected_groups(store, "main")
    found = rows(exported / "tables.tex")
    assert set(found) == set(expected)
    check_merged(found, expected)
    assert any(group["n"] > 1 for group in expected.values()), "main has repeats: mean +- std is printed"
    for group_hash, cells in found.items():
        group = expected[group_hash]
        label, tpot, speedup, ppl, dppl, memory, repeats, samples = cells
        assert close(tpot, mean_std(group, "tpot"), 2), (label, tpot, group)
        assert close(ppl, [group["ppl"]], 2), (label, ppl, group)  # one text sample: no std over samples
        assert close(memory, mean_std(group, "mem"), 0), (label, memory, group)
        assert int(repeats) == group["n"] and int(samples) == group["n_samples"] == 1
        if group["method"] == "recompute":
            assert speedup == dppl == r"\textit{ref.}"
        else:
            assert close(speedup, [group["speedup"]], 2) and check_delta(dppl, group), (label, group)


def storage_groups(store: Path) -> dict[str, dict]:
    """Per setting of the layout and compile experiments, by plain SQL over the runs: its layout, compile, R, TPOT
    (mean, std, n over its done timing runs), speedup over the grid's recompute TPOT of the same model, cap and
    compile (compiled against compiled), TPOT over the compact eager setting's of the same method and R, and compile_s
    (mean, std)."""
    with duckdb.connect(str(store), read_only=True) as con:
        frame = con.execute("""
            WITH chosen AS (SELECT DISTINCT setting_hash, config_group_hash FROM configurations
                            WHERE grid = $grid AND experiment IN ('layout', 'compile')),
            done AS (SELECT c.setting_hash, c.method, c.layout, c.compile, c.compress_every, c.model, c.cap,
                         r.tpot_ms_mean, r.compile_s, r.peak_memory_bytes
                     FROM (SELECT DISTINCT setting_hash, config_group_hash, run_hash, method, layout, compile,
                               compress_every, model, cap FROM configurations WHERE grid = $grid) c
                     JOIN chosen USING (setting_hash, config_group_hash) JOIN runs r USING (run_hash)
                     WHERE r.status = 'done'),
            base AS (SELECT c.model, c.cap, c.compile, avg(r.tpot_ms_mean) AS base_tpot
                     FROM (SELECT DISTINCT run_hash, model, cap, compile FROM configurations
                           WHERE grid = $grid AND method = 'recompute' AND protocol = 'stepwise') c
                     JOIN runs r USING (run_hash) WHERE r.status = 'done' GROUP BY ALL),
            settings AS (
                SELECT setting_hash, any_value(method) AS method, any_value(layout) AS layout,
                    any_value(compile) AS compile,
                    any_value(compress_every) AS r, any_value(model) AS model, any_value(cap) AS cap, count(*) AS n,
                    avg(tpot_ms_mean) AS tpot, stddev_samp(tpot_ms_mean) AS tpot_std,
                    avg(compile_s) AS compile_s, stddev_samp(compile_s) AS compile_s_std,
                    avg(peak_memory_bytes) / 1048576 AS mem, stddev_samp(peak_memory_bytes) / 1048576 AS mem_std
                FROM done GROUP BY setting_hash)
            SELECT s.*, b.base_tpot / s.tpot AS speedup, s.tpot / c.tpot AS compact_ratio
            FROM settings s JOIN base b USING (model, cap, compile)
            LEFT JOIN settings c ON c.method = s.method AND c.r = s.r AND c.cap = s.cap AND c.layout = 'compact'
                AND c.compile = 'none'
        """, {"grid": PAPER_GRID}).df()
    return {row.setting_hash: row._asdict() for row in frame.itertuples()}


def test_main_table_shows_ring_rows_beside_their_compact_rows(exported, store):
    """Each streaming policy of the main table is followed by its ring settings (eager, then compiled): their own
    TPOT, speedup, memory and repeats, the compact row's quality (not measured again: the exactness tests)."""
    expected = storage_groups(store)
    lines = [line for line in (exported / "tables.tex").read_text().splitlines() if r" \\ % " in line]
    ring = [i for i, line in enumerate(lines) if " % ring setting " in line]
    assert len(ring) == 3, lines  # strict ring; lazy ring, eager and compiled (smoke-paper's layout and compile)
    for index in ring:
        body, setting = lines[index].split(r" \\ % ring setting ")
        label, tpot, speedup, ppl, dppl, memory, repeats, samples = body.split(" & ")
        group = expected[setting.strip()]
        assert group["layout"] == "ring" and label.split(",")[1:2] == [" ring"]
        assert (", compiled (default)" in label) == (group["compile"] == "default")
        assert close(tpot, mean_std(group, "tpot"), 2) and close(speedup, [group["speedup"]], 2), (label, group)
        assert close(memory, mean_std(group, "mem"), 0) and int(repeats) == group["n"] and samples == "--"
        assert ppl == dppl == r"\textit{as compact}"
        # after the compact row of its policy (or another ring row of it)
        above = next(line for line in reversed(lines[:index]) if " % ring setting " not in line)
        assert above.split(" & ")[0] == label.split(",")[0]
    assert ring[1] + 1 == ring[2] and "compiled" not in lines[ring[1]] and "compiled" in lines[ring[2]]
    assert "timed only" in (exported / "tables.tex").read_text()
    # The compiled ring row's speedup is over the compiled recompute, shown after the recompute row: the reference of
    # the compiled rows (compiled against compiled), its quality the eager recompute's.
    (index,) = [i for i, line in enumerate(lines) if " % compiled setting " in line]
    body, setting = lines[index].split(r" \\ % compiled setting ")
    label, tpot, speedup, ppl, dppl, memory, repeats, samples = body.split(" & ")
    group = expected[setting.strip()]
    assert (group["method"], group["layout"], group["compile"]) == ("recompute", "compact", "default")
    assert label.startswith("Recompute") and label.endswith(", compiled (default)") and lines[index - 1].startswith(
        label.removesuffix(", compiled (default)"))
    assert close(tpot, mean_std(group, "tpot"), 2) and speedup == dppl == r"\textit{ref.}" and ppl == AS_EAGER
    assert int(repeats) == group["n"] and samples == "--"
    (compiled_ring,) = [expected[lines[i].split(" % ring setting ")[1].strip()] for i in ring if "compiled" in lines[i]]
    assert compiled_ring["speedup"] == pytest.approx(group["tpot"] / compiled_ring["tpot"])
    assert COMPILED_NOTE.strip() in " ".join((exported / "tables.tex").read_text().split())


def test_layout_table_numbers_equal_the_store(exported, store):
    """layout.tex: per setting of the layout and compile experiments, TPOT, speedup over recompute, TPOT over the
    compact eager setting's of the same policy, compile time (compiled only) and n, from the runs themselves."""
    expected = storage_groups(store)
    found = rows(exported / "layout.tex")
    assert set(found) == set(expected) and len(found) == 7
    assert {(g["method"], g["layout"], g["compile"]) for g in expected.values()} == {
        ("streaming", "compact", "none"), ("streaming", "ring", "none"), ("streaming", "ring", "default"),
        ("recompute", "compact", "none"), ("recompute", "compact", "default")}
    for setting, (policy, layout, compile_, tpot, speedup, ratio, compile_s, memory, n) in found.items():
        group = expected[setting]
        assert (layout, compile_) == (group["layout"], group["compile"])
        assert close(tpot, mean_std(group, "tpot"), 2), (setting, group)
        # compiled against compiled: the recompute rows (eager and compiled) are the references
        assert speedup == r"\textit{ref.}" if group["method"] == "recompute" else close(
            speedup, [group["speedup"]], 2), (setting, group)
        assert close(memory, mean_std(group, "mem"), 0) and int(n) == group["n"]
        if group["layout"] == "compact" and group["compile"] == "none":
            assert ratio == r"\textit{ref.}" and compile_s == "--"
            assert policy.startswith(("Strict", "Lazy", "Recompute")), policy
            continue
        assert close(ratio, [group["compact_ratio"]], 2), (setting, ratio, group)
        if group["compile"] == "none":
            assert compile_s == "--"
        else:
            assert close(compile_s, mean_std(group, "compile_s"), 1) and group["compile_s"] > 0


@pytest.mark.parametrize("tex, experiments", [
    ("ablations.tex", ["ladder"]),
    ("sweeps.tex", ["r_sweep", "slack_sweep", "max_drop_sweep", "sink_sweep", "cap_mode"]),
])
def test_ablation_and_sweep_numbers_equal_the_store(exported, store, tex, experiments):
    found = rows(exported / tex)
    expected = {}
    for experiment in experiments:
        expected.update(expected_groups(store, experiment))
    assert set(found) == set(expected)
    if tex == "ablations.tex":
        check_merged(found, expected)
    for cells in found.values():
        # A row of equivalent settings prints the one with the most repeats of the shared runs.
        group = max((g for h, g in expected.items() if found[h] is cells), key=lambda g: g["n"])
        assert close(cells[1], mean_std(group, "tpot"), 2) and close(cells[3], [group["ppl"]], 2), cells
        assert close(cells[2], [group["speedup"]], 2) and check_delta(cells[4], group), cells
        assert int(cells[-2]) == group["n"] and int(cells[-1]) == 1
    if tex == "ablations.tex":
        # smoke's ladder: slack 8 < R - 1 = 15 leaves staged eviction inactive, so + slack and + slack + max_drop keep
        # the same tokens as lazy: one row, its label naming the equivalent settings.
        labels = list({id(cells): cells[0] for cells in found.values()}.values())
        assert [label.split(" (")[0] for label in labels] == ["Strict", "Lazy"]
        assert labels[1].endswith(r"$\equiv$ slack{=}8, max\_drop{=}0; slack{=}8, max\_drop{=}8")


def test_profile_numbers_equal_the_store(exported, store):
    """Total ms per token, recomputed from the per-token rows, is the TPOT the runs table holds."""
    expected = {h: g for h, g in expected_groups(store, "main").items() if g["method"] == "streaming"}
    found = rows(exported / "profile.tex")
    assert set(found) == set(expected)
    for group_hash, (label, compactions, forward, compaction, total, n) in found.items():
        group = expected[group_hash]
        assert close(total, mean_std(group, "tpot"), 3), (label, total, group)
        assert numbers(compactions)[0] == pytest.approx(group["compactions"], abs=0.05)
        assert numbers(forward)[0] + numbers(compaction)[0] == pytest.approx(numbers(total)[0], abs=0.0025)
        assert int(n) == group["n"]


def test_speculative_numbers_equal_the_store(exported, store):
    """tokens/s, speedup vs spec none under the same policy, acceptance and identical output, from the runs table."""
    with duckdb.connect(str(store), read_only=True) as con:
        frame = con.execute("""
            SELECT c.config_group_hash AS group_hash, any_value(spec) AS spec, any_value(compress_every) AS r,
                count(*) AS n, avg(tokens_per_s) AS tps, avg(acceptance_rate) AS acceptance,
                avg(mean_accepted_length) AS length, any_value(generated_hash) AS output
            FROM (SELECT DISTINCT config_group_hash, run_hash FROM configurations
                  WHERE grid = ? AND experiment = 'speculative') c JOIN runs r USING (run_hash)
            WHERE status = 'done' AND mode = 'generate'
            GROUP BY c.config_group_hash""", [PAPER_GRID]).df()
    found = {}  # generation rows are configurations (repeats aggregated): their comment names the group hash
    for line in (exported / "speculative.tex").read_text().splitlines():
        if " % group " in line:
            body, group = line.split(r" \\ % group ")
            found[group.strip()] = body.split(" & ")
    assert set(found) == set(frame.group_hash)
    for group in frame.itertuples():
        reference = frame[(frame.spec == "none") & (frame.r == group.r)].iloc[0]
        policy, spec, k, tps, speedup, acceptance, length, identical, n = found[group.group_hash]
        assert close(tps, [group.tps], 1) and close(length, [group.length], 2) and int(n) == group.n
        assert identical == ("yes" if group.output == reference.output else "no")
        if group.spec == "none":
            assert speedup == r"\textit{ref.}" and acceptance == "--"
        else:
            assert close(speedup, [group.tps / reference.tps], 2) and close(acceptance, [group.acceptance], 2)
    assert {cells[7] for cells in found.values()} == {"yes"}  # greedy speculation: identical output


def damaged_copy(store: Path, tmp_path: Path, *statements: str) -> Path:
    copy = tmp_path / "damaged.duckdb"
    copy_store(store, copy)
    with duckdb.connect(str(copy)) as con:
        for statement in statements:
            con.execute(statement)
    return copy


def test_missing_and_failed_runs_fail_the_export_listing_them(store, tmp_path):
    with duckdb.connect(str(store), read_only=True) as con:
        lost, broken = [row[0] for row in con.execute(
            "SELECT run_hash FROM experiments WHERE grid = ? AND experiment IN ('ladder', 'sink_sweep') "
            "ORDER BY experiment, run_hash LIMIT 2 OFFSET 1", [PAPER_GRID]).fetchall()]
    copy = damaged_copy(store, tmp_path, f"DELETE FROM runs WHERE run_hash = '{lost}'",
                        f"UPDATE runs SET status = 'failed', error = 'CUDA out of memory' WHERE run_hash = '{broken}'")
    out = tmp_path / "generated"
    with pytest.raises(ExportError) as failure:
        export(copy, PAPER_GRID, out)
    message = str(failure.value)
    assert f"run {lost} (not run yet) pending" in message
    assert f"run {broken} (streaming) failed: CUDA out of memory" in message
    assert "nothing was written" in message and not out.exists()


def test_a_missing_experiment_is_named(store, tmp_path):
    copy = damaged_copy(store, tmp_path, f"DELETE FROM experiments WHERE grid = '{PAPER_GRID}' "
                                         "AND experiment = 'sink_sweep'")
    with pytest.raises(ExportError, match=f"experiment sink_sweep: not in grid {PAPER_GRID}"):
        export(copy, PAPER_GRID, tmp_path / "generated")


def test_a_grid_without_the_optional_experiments_exports_without_their_tables(store, exported, tmp_path):
    """A grid of score experiments only (grids/paper-scale.yaml, grids/paper-full.yaml) exports its tables; the optional
    files an earlier export of another grid left in the folder are removed, never mixed in, and the paper has no
    section for them (where the full grid's has both)."""
    copy = damaged_copy(store, tmp_path, f"DELETE FROM experiments WHERE grid = '{PAPER_GRID}' AND experiment IN "
                                         "('speculative', 'quantization', 'quantization_sinks', 'retrieval', "
                                         "'layout', 'compile')")
    out = tmp_path / "generated"
    shutil.copytree(exported, out)  # the folder as the full grid's export left it
    optional = ("speculative.tex", "quantization.tex", "quantization.pdf", "quantization.png", "retrieval.tex",
                "needle.pdf", "needle.png", "layout.tex")
    assert all((out / name).is_file() for name in optional)
    written = export(copy, PAPER_GRID, out)
    assert not any((out / name).exists() for name in optional)
    assert {path.name for path in written} >= {"tables.tex", "ablations.tex", "sweeps.tex", "figures.tex"}
    # the main table without its ring and compiled rows (the layout experiments are gone), else the same
    ringless = [line for line in (exported / "tables.tex").read_text().splitlines()
                if " % ring setting " not in line and " % compiled setting " not in line]
    assert (out / "tables.tex").read_text().splitlines() == [
        line.replace(STORAGE_NOTE + COMPILED_NOTE, "") for line in ringless]
    require("pdflatex")
    optional_labels = ("tab:speculative", "tab:quantization", "fig:quantization", "tab:retrieval", "fig:needle",
                       "tab:layout")
    full = paper_labels(exported, tmp_path / "full")
    assert "tab:main" in full and all(label in full for label in optional_labels)
    scores_only = paper_labels(out, tmp_path / "scores-only")
    assert "tab:main" in scores_only and not any(label in scores_only for label in optional_labels)


def paper_labels(generated: Path, build: Path) -> str:
    """The labels paper/main.tex defines over the exported folder `generated` (its .aux after one pdflatex pass)."""
    build.mkdir()
    command = ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"-output-directory={build}",
               rf"\def\gendir{{{generated.resolve()}}}\input{{{ROOT / 'paper' / 'main.tex'}}}"]
    result = subprocess.run(command, cwd=ROOT / "paper", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    return (build / "main.aux").read_text()


def test_a_pending_speculative_run_stops_the_export(store, tmp_path):
    with duckdb.connect(str(store), read_only=True) as con:
        lost = con.execute("SELECT min(run_hash) FROM experiments WHERE grid = ? AND experiment = 'speculative'",
                           [PAPER_GRID]).fetchone()[0]
    copy = damaged_copy(store, tmp_path, f"DELETE FROM runs WHERE run_hash = '{lost}'")
    with pytest.raises(ExportError, match=f"experiment speculative: run {lost} \\(not run yet\\) pending"):
        export(copy, PAPER_GRID, tmp_path / "generated")


def test_stale_runs_are_excluded_unless_asked(store, tmp_path):
    copy = damaged_copy(store, tmp_path, "UPDATE runs SET code_version = 'older-code' WHERE method = 'recompute' "
                                         "AND \"repeat\" = 1")
    with pytest.raises(ExportError, match="stale .*--include-stale"):
        export(copy, PAPER_GRID, tmp_path / "strict")
    export(copy, PAPER_GRID, tmp_path / "with-stale", include_stale=True)
    tables = (tmp_path / "with-stale" / "tables.tex").read_text()
    assert r"Recompute$^\dagger$" in tables and "made by other evaluation code" in tables


def test_cli_exports_and_builds_the_pdf(store, tmp_path):
    out = tmp_path / "generated"
    command = [sys.executable, "-m", "paper", "export", "--store", str(store), "--grid", PAPER_GRID, "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "tables.tex").is_file()
    wrong = subprocess.run([*command[:-4], "--grid", "nope", "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert wrong.returncode == 1 and "--grid nope is not in" in wrong.stderr
    require("pdflatex")
    built = subprocess.run([sys.executable, "-m", "paper", "pdf", "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert (out / "main.pdf").read_bytes()[:5] == b"%PDF-"


def test_quantization_table_numbers_equal_the_store(exported, store):
    """PPL, ΔPPL paired with the same policy with kv_quant and weight_quant none on the same tokens, the TPOT ratio
    over it, measured KV bytes per token; from the runs themselves (one text sample: no interval)."""
    with duckdb.connect(str(store), read_only=True) as con:
        frame = con.execute("""
            SELECT c.setting_hash, any_value(c.compress_every) AS r, any_value(c.kv_quant) AS kv,
                any_value(c.weight_quant) AS w, any_value(c.kv_quant_sinks) AS sinks, avg(ppl) AS ppl,
                avg(tpot_ms_mean) AS tpot, avg(kv_bytes_per_token) AS kv_bytes, avg(weights_bytes) AS weights,
                any_value(run_hash) AS run_hash
            FROM (SELECT DISTINCT c.setting_hash, c.compress_every, c.kv_quant, c.weight_quant, c.kv_quant_sinks,
                      c.run_hash
                  FROM configurations c JOIN (
                      SELECT DISTINCT setting_hash, config_group_hash FROM configurations
                      WHERE grid = $grid AND experiment IN ('quantization', 'quantization_sinks')
                  ) USING (setting_hash, config_group_hash)
                  WHERE c.grid = $grid) c  -- the measurement pools its repeats from anywhere in the grid
            JOIN runs USING (run_hash)
            WHERE status = 'done' GROUP BY c.setting_hash
        """, {"grid": PAPER_GRID}).df()
        nll = {row.run_hash: con.execute("SELECT nll FROM tokens WHERE run_hash = ? ORDER BY step",
                                         [row.run_hash]).df().nll.to_numpy() for row in frame.itertuples()}
    floats = {row.r: row for row in frame.itertuples() if row.kv == "none" and row.w == "none"}
    found = {}  # quantization.tex rows are per setting: its float reference is one too
    for line in (exported / "quantization.tex").read_text().splitlines():
        if " % setting " in line:
            body, setting = line.split(r" \\ % setting ")
            found[setting.strip()] = body.split(" & ")
    assert set(found) == set(frame.setting_hash) and len(found) == 10
    for row in frame.itertuples():
        label, ppl, delta, tpot, ratio, kv_bytes, weights, n_r, n_t = found[row.setting_hash]
        reference = floats[row.r]
        assert close(ppl, [row.ppl], 3) and close(tpot.split(r"\pm")[0], [row.tpot], 2), label
        if row.kv == "none" and row.w == "none":
            assert "ref." in delta and "ref." in ratio
            continue
        paired = 100 * (np.exp(nll[row.run_hash].mean() - nll[reference.run_hash].mean()) - 1)
        assert close(delta, [paired], 2), (label, delta)
        assert close(ratio, [row.tpot / reference.tpot], 2) and close(kv_bytes, [row.kv_bytes], 0)
        assert close(weights, [row.weights / 2**20], 1) and n_t.strip() == "1"
    assert frame[frame.kv == "int8"].kv_bytes.max() < 0.5 * frame[frame.kv == "none"].kv_bytes.min()
    assert frame[frame.w == "int8"].weights.max() < frame[frame.w == "none"].weights.min()


def test_failed_quantization_configurations_are_rows_with_their_reason(store):
    from store import queries

    with queries.connect(store) as con:
        groups = queries.setting_table(con, PAPER_GRID, ["quantization"])
        failed = queries.run_table(con, PAPER_GRID).head(1).assign(
            status="failed", kv_quant="int4", kv_quant_sinks="full", weight_quant="int4", compress_every=16,
            error="ModelLoadError: weight_quant = int4 cannot run on cpu with torchao 0.18.0\nTraceback ...")
    text = quantization_table(groups, failed)
    line = next(line for line in text.splitlines() if "failed" in line and "% run" in line)
    assert "weight\\_quant = int4 cannot run on cpu" in line and "Traceback" not in line
    assert line.count("---") == 6  # a row, not a number


def wilson(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out here (not store.stats') to check the table's."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def test_retrieval_numbers_equal_the_store(exported, store):
    """Every row of retrieval.tex (one per task configuration and depth): accuracy, its Wilson interval, the answer
    NLL, distance, retained and n equal the trials table's rows of that configuration's done runs, by plain SQL."""
    with duckdb.connect(str(store), read_only=True) as con:
        expected = con.execute("""
            SELECT c.config_group_hash AS group_hash, t.depth, count(*) AS n, sum(t.score) AS correct,
                avg(t.answer_nll) AS nll, avg(t.retained) AS retained, avg(t.distance) AS distance
            FROM (SELECT DISTINCT config_group_hash, run_hash FROM configurations
                  WHERE grid = $grid AND experiment = 'retrieval') c
            JOIN runs r USING (run_hash) JOIN trials t USING (run_hash)
            WHERE r.status = 'done' GROUP BY ALL
        """, {"grid": PAPER_GRID}).df()
    found = []
    for line in (exported / "retrieval.tex").read_text().splitlines():
        if " % group " in line:
            body, group = line.split(r" \\ % group ")
            found.append((group.strip(), [cell.removeprefix("\\raggedright ") for cell in body.split(" & ")]))
    assert len(found) == len(expected) >= 6, (found, expected)
    for group, cells in found:
        row = expected[(expected.group_hash == group) & np.isclose(expected.depth, float(cells[2]))]
        assert len(row) == 1, (group, cells)
        row = row.iloc[0]
        low, high = wilson(row.correct, int(row.n))
        assert cells[1] and close(cells[3], [row.distance], 0) and close(cells[4], [row.retained], 0), cells
        assert close(cells[5], [row.correct / row.n, low, high], 2), (cells, row.to_dict())
        assert close(cells[6], [row.nll], 2) and cells[7] == str(int(row.n)), cells


def test_a_failed_retrieval_run_stops_the_export(store, tmp_path):
    with duckdb.connect(str(store), read_only=True) as con:
        broken = con.execute("SELECT min(run_hash) FROM experiments WHERE grid = ? AND experiment = 'retrieval'",
                             [PAPER_GRID]).fetchone()[0]
    copy = damaged_copy(store, tmp_path, f"UPDATE runs SET status = 'failed', error = 'killed' WHERE run_hash = "
                                         f"'{broken}'")
    out = tmp_path / "generated"
    with pytest.raises(ExportError, match=f"experiment retrieval: run {broken} \\([a-z]+\\) failed: killed"):
        export(copy, PAPER_GRID, out)
    assert not out.exists()


def test_a_compiled_run_without_compile_s_stops_the_export(store, tmp_path):
    """layout.tex prints every compiled setting's compile time: a store whose compiled run lacks it (written by code
    before the knob) is refused, naming the setting, rather than printed with a gap."""
    copy = damaged_copy(store, tmp_path, "UPDATE runs SET compile_s = NULL WHERE compile <> 'none'")
    out = tmp_path / "generated"
    with pytest.raises(ExportError, match=r"experiment compile: setting \w+ \(layout ring, compile default\): "
                                          "compiled, but no compile_s recorded"):
        export(copy, PAPER_GRID, out)
    assert not out.exists()


def test_a_compiled_setting_without_a_compiled_recompute_stops_the_export(store, tmp_path):
    """A compiled ring setting is timed against the compiled recompute only: without one in the grid (a store made
    before the compile experiments held it) the export is refused, naming the setting and the run to add, never printed
    with the eager recompute's speedup."""
    compiled_recompute = "SELECT run_hash FROM runs WHERE method = 'recompute' AND compile <> 'none'"
    copy = damaged_copy(store, tmp_path, f"DELETE FROM experiments WHERE run_hash IN ({compiled_recompute})",
                        f"DELETE FROM configurations WHERE run_hash IN ({compiled_recompute})")
    out = tmp_path / "generated"
    with pytest.raises(ExportError, match=r"experiment compile: setting \w+ \(layout ring, compile default\): no "
                                          r"recompute baseline in grid smoke-paper with the same tokens, cap, device "
                                          r"and compile \(default\): add method recompute at compile default"):
        export(copy, PAPER_GRID, out)
    assert not out.exists()
