"""The paper's LaTeX tables and its findings paragraph, from what paper/gather.py read: every number formatted by
paper/latex.py, refused rather than printed as a placeholder. Never queries the store."""

from __future__ import annotations

import pandas as pd

from paper.gather import LADDER, MAIN, SWEEPS, Gathered
from paper.labels import METHOD_ORDER, STALE_MARK, ladder_label, ladder_rung, method_name, row_label
from paper.latex import Table, escape, knob, mean_std, number, ordinal
from store import queries

EQUIVALENT_MARK = r"$\equiv$"
EQUIVALENT_NOTE = (r" $\equiv$: configurations that keep the same tokens at every step (one computation, run once), "
                   "shown as one row.")


def _sorted(groups: pd.DataFrame) -> pd.DataFrame:
    order = groups.method.map(METHOD_ORDER).fillna(9)
    knobs = [k for k in queries.SETTING_KNOBS if k != "method" and k in groups]
    return groups.assign(_order=order).sort_values(["_order", *knobs]).drop(columns="_order")


def merge_equivalent(groups: pd.DataFrame) -> pd.DataFrame:
    """Settings of one table measured by the same runs (configurations that keep the same tokens at every step) as one
    row, at the place of the first: the numbers of the one with the most repeats and samples (it pools the most of the
    shared runs; the first among equals), `equivalents` the settings of the others ('' when none), `setting_hashes`
    all their hashes. One computation never shows as several results."""
    if groups.empty:
        return groups.assign(equivalents=pd.Series(dtype=str), setting_hashes=pd.Series(dtype=str))
    keys = list(zip(groups.run_groups, groups.code_version, strict=True))
    blocks: dict[tuple, list[int]] = {}
    for position, key in enumerate(keys):
        blocks.setdefault(key, []).append(position)
    kept, equivalents, hashes = [], [], []
    for positions in blocks.values():
        block = groups.iloc[positions]
        differing = [k for k in queries.KNOBS if k in block and block[k].astype(str).nunique() > 1]
        chosen = max(range(len(positions)), key=lambda i: (block.n_repeats.iloc[i], block.n_samples.iloc[i], -i))
        kept.append(positions[chosen])
        equivalents.append("; ".join(", ".join(knob(k, row[k]) for k in differing)
                                     for i, (_, row) in enumerate(block.iterrows()) if i != chosen))
        hashes.append(", ".join(block.setting_hash))
    return groups.iloc[kept].assign(equivalents=equivalents, setting_hashes=hashes)


def _equivalent(row) -> str:
    return f" {EQUIVALENT_MARK} {row.equivalents}" if row.equivalents else ""


RESULT_COLUMNS = [("Method", "l"), ("TPOT (ms)", "r"), ("Speedup", "r"), ("PPL", "r"), (r"$\Delta$PPL (\%)", "r")]


N_COLUMNS = [("$n_r$", "r"), ("$n_t$", "r")]  # timing repeats, text samples


INTERVAL_NOTE = ("in brackets its 95\\,\\% Student-$t$ interval over the text samples, "
                 "$t_{0.975,n-1}\\,s/\\sqrt{n}$; $^{*}$: the interval excludes zero, a resolved effect")


def paired_cell(mean: float, low: float, high: float, n: int, resolved: bool, *, what: str) -> str:
    """`$+0.72$ [$-0.31$, $+1.75$]`, with `$^{*}$` when the interval excludes zero; the mean alone (n = 1) when there
    is no interval."""
    text = f"${number(mean, 2, signed=True, what=what)}$"
    if n > 1:
        text += (f" {{\\scriptsize[${number(low, 2, signed=True, what=f'interval of {what}')}$, "
                 f"${number(high, 2, signed=True, what=f'interval of {what}')}$]}}")
        text += "$^{*}$" if resolved else ""
    return text


def result_cells(row) -> list[str]:
    """TPOT, speedup, PPL, ΔPPL: the cells every results table shares. ΔPPL is paired per text sample, with its 95 %
    interval and how many samples agree with its sign (k/n)."""
    what = f"setting {row.setting_hash}"
    if row.is_baseline:
        speedup, delta = r"\textit{ref.}", r"\textit{ref.}"
    else:
        speedup = f"${number(row.speedup, 2, what=f'speedup of {what}')}\\times$"
        delta = paired_cell(row.delta_ppl_pct, row.delta_ppl_low, row.delta_ppl_high, int(row.n_pairs),
                            bool(row.delta_ppl_resolved), what=f"delta PPL of {what}")
        delta += f" {{\\scriptsize({int(row.agree)}/{int(row.n_pairs)})}}"
    return [mean_std(row.tpot_ms, row.tpot_ms_std, row.n_repeats, 2, what=f"TPOT of {what}"), speedup,
            mean_std(row.ppl, row.ppl_std, row.n_samples, 2, what=f"PPL of {what}"), delta]


def n_cells(row) -> list[str]:
    return [str(int(row.n_repeats)), str(int(row.n_samples))]


def _caption(text: str, groups: pd.DataFrame, merged: bool = False) -> str:
    devices = ", ".join(sorted({escape(d) for d in groups.device_name}))
    protocols = ", ".join(sorted({escape(p) for p in groups.quality_protocol}))
    stale = f" {STALE_MARK}: made by other evaluation code than the current one." if groups.stale.any() else ""
    strides = sorted({int(k) for k in groups.quality_stride.dropna() if k > 1}) if "quality_stride" in groups else []
    if strides:  # the baseline scored a subset of steps: its PPL is over those, everyone else's over every step
        stale += (f" The recompute baseline's PPL is over every {'/'.join(ordinal(s) for s in strides)} step only (a "
                  "cap-token forward each); every $\\Delta$PPL pairs a setting with it on those steps.")
    return (f"{text} TPOT: mean $\\pm$ std over the $n_r$ stepwise timing repeats of each setting; PPL: mean $\\pm$ "
            f"std over its $n_t$ text samples ({protocols} protocol); $\\Delta$PPL: mean over the text samples of the "
            f"change paired per sample with the recompute baseline on the same tokens, {INTERVAL_NOTE} (in "
            f"parentheses: samples agreeing in sign); speedup relative to the "
            f"baseline's TPOT (same grid, text, cap and device: {devices}).{stale}"
            + (EQUIVALENT_NOTE if merged else ""))


STORAGE_NOTE = (" Ring rows (layout and compile experiments) are timed only: the ring cache refuses the parallel "
                "protocol, and its per-step NLLs equal the compact cache's (the engine's exactness tests), so its "
                "PPL and $\\Delta$PPL are those of the compact row of the same policy (\\textit{as compact}); "
                "compile: torch.compile of the decode step (its compile time, a warmup step never in TPOT, is in "
                "Table~\\ref{tab:layout}).")
# Where a compiled row is shown: which recompute its speedup is over (store.queries.setting_table pairs by `compile`).
COMPILED_NOTE = (" A compiled row's speedup is over the compiled recompute's TPOT (compiled against compiled: the row "
                 "\\textit{Recompute, compiled}, whose PPL is the eager recompute's, \\textit{as eager}), an eager "
                 "row's over the eager recompute's.")
AS_COMPACT = r"\textit{as compact}"
AS_EAGER = r"\textit{as eager}"


def storage_name(row) -> str:
    """', ring', ', ring, compiled (default)': how a setting's cache is stored and run, after its label ('' for the
    compact eager cache, the study's)."""
    parts = [escape(row.layout)] if row.layout != "compact" else []
    if row.compile != "none":
        parts.append(f"compiled ({escape(row.compile)})")
    return "".join(f", {part}" for part in parts)


def ring_rows(gathered: Gathered, main: pd.DataFrame) -> pd.DataFrame:
    """The layout and compile experiments' ring or compiled settings of the main table's streaming policies and of its
    recompute baseline (equal to one of its rows in every knob but layout and compile: `storage_key`; same device and
    code), to show beside their compact eager rows."""
    if gathered.storage is None:
        return main.iloc[:0]
    storage = gathered.storage
    other = storage[(storage.layout != "compact") | (storage.compile != "none")]
    policies = main[main.method.isin(["streaming", queries.BASELINE_METHOD])][
        ["storage_key", "device_name", "code_version"]]
    ring = other.merge(policies.drop_duplicates(), on=list(policies.columns))
    # eager before compiled, each after its compact row
    return ring.assign(_compiled=ring.compile != "none").sort_values(["_compiled", "compile"]).drop(columns="_compiled")


def main_table(gathered: Gathered) -> str:
    """The main results; where the grid times the ring layout (experiments layout and compile), each of the main
    table's streaming policies is followed by its ring (and compiled) rows: their own TPOT, speedup and memory, their
    quality the compact row's (rows beside compact, not a layout column: only timing differs between layouts, and
    recompute has no layout). A compiled recompute row follows the recompute row: the reference of the compiled rows'
    speedups (compiled against compiled)."""
    groups = _sorted(gathered.experiments[MAIN])
    knobs = [k for k in queries.varying_knobs(groups) if k not in ("method", "compress_every") and k not in
             queries.CONTEXT]
    merged = merge_equivalent(groups)
    ring = ring_rows(gathered, groups)
    table = Table(columns=[*RESULT_COLUMNS, ("Peak mem. (MiB)", "r"), *N_COLUMNS], label="tab:main",
                  caption=_caption(f"Main results (grid {escape(gathered.grid)}).", groups,
                                   merged.equivalents.any()) + (STORAGE_NOTE if not ring.empty else "")
                  + (COMPILED_NOTE if (ring.compile != "none").any() else ""))
    for (dataset, device), block in merged.groupby(["dataset", "device_name"], sort=True):
        rows, notes = [], []
        for row in block.itertuples():
            rows.append([row_label(row, ["compress_every", *knobs]) + _equivalent(row), *result_cells(row),
                         _memory(row), *n_cells(row)])
            notes.append(f"setting {row.setting_hashes}")
            twins = ring[(ring.storage_key == row.storage_key) & (ring.device_name == device)
                         & (ring.code_version == row.code_version)]
            for twin in twins.itertuples():
                what = f"setting {twin.setting_hash}"
                tpot = mean_std(twin.tpot_ms, twin.tpot_ms_std, twin.n_repeats, 2, what=f"TPOT of {what}")
                if twin.is_baseline:  # the compiled recompute: the compiled rows' reference, the eager one's NLLs
                    cells, note = [tpot, r"\textit{ref.}", AS_EAGER, r"\textit{ref.}"], "compiled setting"
                else:
                    cells = [tpot, f"${number(twin.speedup, 2, what=f'speedup of {what}')}\\times$", AS_COMPACT,
                             AS_COMPACT]
                    note = "ring setting"
                rows.append([row_label(twin, ["compress_every", *knobs]) + storage_name(twin), *cells,
                             _memory(twin), str(int(twin.n_repeats)), "--"])
                notes.append(f"{note} {twin.setting_hash}")
        table.add_panel(rf"\emph{{{escape(dataset)}}} ({escape(device)})", rows, notes)
    return table.render()


def _memory(row) -> str:
    return mean_std(row.peak_memory_mib, row.peak_memory_mib_std, row.n_repeats, 0,
                    what=f"peak memory of {row.setting_hash}")


def layout_table(gathered: Gathered) -> str:
    """The layout and compile experiments: per setting, its storage and compile setting, TPOT, speedup over the
    recompute with the same compile (the recompute rows are the references), TPOT over its compact eager twin's,
    compile time and peak memory (timing only: see STORAGE_NOTE)."""
    settings = gathered.storage
    assert settings is not None
    devices = ", ".join(sorted({escape(d) for d in settings.device_name}))
    table = Table(
        columns=[("Policy", "l"), ("Layout", "l"), ("Compile", "l"), ("TPOT (ms)", "r"), ("Speedup", "r"),
                 ("vs compact", "r"), ("Compile (s)", "r"), ("Peak mem. (MiB)", "r"), ("$n_r$", "r")],
        label="tab:layout",
        caption=("The cache's storage and the compiled decode step: compact (entries moved and re-rotated at every "
                 "compaction, the study's) vs ring (fixed slots, nothing moved), eager or compiled with "
                 "torch.compile. TPOT: mean $\\pm$ std over the $n_r$ stepwise timing repeats; speedup over the "
                 "TPOT of the recompute baseline run the same way (compiled against compiled: a compiled row's over "
                 "the compiled recompute's, an eager row's over the eager one's); vs compact: TPOT over that of the "
                 "same setting stored compact and run eager, on the same tokens; compile: the first compiled step's "
                 "wall time (a warmup step, never in "
                 "TPOT), mean $\\pm$ std over the repeats. Timing only: a ring setting's per-step NLLs equal the "
                 f"compact cache's (the engine's exactness tests). Device: {devices}."))
    ordered = settings.assign(_layout=settings.layout != "compact", _compiled=settings.compile != "none",
                              _method=settings.method.map(METHOD_ORDER).fillna(9))
    ordered = ordered.sort_values(["_method", "cap", "compress_every", "_layout", "_compiled", "compile"])
    for _, block in ordered.groupby(["_method", "cap", "compress_every"], sort=False):
        rows, notes = [], []
        for row in block.itertuples():
            what = f"setting {row.setting_hash}"
            reference = row.layout == "compact" and row.compile == "none"
            compile_s = "--" if row.compile == "none" else mean_std(
                row.compile_s, row.compile_s_std, row.n_repeats, 1, what=f"compile time of {what}")
            rows.append([
                "", escape(row.layout), escape(row.compile),
                mean_std(row.tpot_ms, row.tpot_ms_std, row.n_repeats, 2, what=f"TPOT of {what}"),
                r"\textit{ref.}" if row.is_baseline else
                f"${number(row.speedup, 2, what=f'speedup of {what}')}\\times$",
                r"\textit{ref.}" if reference else
                f"${number(row.compact_ratio, 2, what=f'TPOT over compact of {what}')}\\times$",
                compile_s, _memory(row), str(int(row.n_repeats))])
            notes.append(f"setting {row.setting_hash}")
        rows[0][0] = row_label(block.iloc[0], ["compress_every", "cap"])
        table.add_panel(None, rows, notes)
    return table.render()


def ladder_table(gathered: Gathered) -> str:
    groups = gathered.experiments[LADDER]
    groups = groups.assign(rung=[ladder_rung(row) for row in groups.itertuples()]).sort_values(
        ["rung", "compress_every", "slack", "max_drop"])
    merged = merge_equivalent(groups)
    # A wrapping label column: each rung names every knob value that makes it.
    table = Table(columns=[("Configuration", "p{4.4cm}"), *RESULT_COLUMNS[1:], ("Compactions", "r"), *N_COLUMNS],
                  label="tab:ablations", caption=_caption("Ablation ladder: strict $\\to$ lazy $\\to$ + slack $\\to$ "
                                                          "+ slack + max\\_drop.", groups,
                                                          merged.equivalents.any()))
    rows = [[ladder_label(row) + _equivalent(row), *result_cells(row),
             f"${number(row.compactions, 1, what='compactions')}$", *n_cells(row)] for row in merged.itertuples()]
    notes = [f"setting {row.setting_hashes}" for row in merged.itertuples()]
    table.add_panel(None, rows, notes)
    return table.render()


def sweeps_table(gathered: Gathered) -> str:
    merged = {name: merge_equivalent(_sorted(gathered.experiments[name])) for name in SWEEPS}
    table = Table(columns=[("Value", "p{4.4cm}"), *RESULT_COLUMNS[1:], *N_COLUMNS], label="tab:sweeps",
                  caption=_caption("Sweeps: one knob varied, the others held fixed.",
                                   pd.concat([gathered.experiments[name] for name in SWEEPS]),
                                   any(frame.equivalents.any() for frame in merged.values())))
    for name, (swept, title) in SWEEPS.items():
        groups = merged[name]
        others = [k for k in queries.varying_knobs(groups) if k not in ("method", swept)]
        fixed = [k for k in ("cap", "sink", "compress_every", "slack", "max_drop") if k != swept and k not in others]
        streaming = groups[groups.method == "streaming"]
        held = ", ".join(knob(k, streaming[k].iloc[0]) for k in fixed) if not streaming.empty else ""
        rows = [[row_label(row, [swept, *others]) + _equivalent(row), *result_cells(row), *n_cells(row)]
                for row in groups.itertuples()]
        notes = [f"setting {row.setting_hashes}" for row in groups.itertuples()]
        table.add_panel(rf"\emph{{{title}}} ({held})", rows, notes)
    return table.render()


def speculative_table(gathered: Gathered) -> str:
    """Speculative decoding under each cache policy: tokens/s, speedup and identical output vs spec none."""
    rows_in = gathered.speculation
    devices = ", ".join(sorted({escape(d) for d in rows_in.device_name}))
    table = Table(
        columns=[("Policy", "l"), ("Spec", "l"), ("$k$", "r"), ("Tokens/s", "r"), ("Speedup", "r"),
                 ("Accept.", "r"), ("Mean acc. len.", "r"), ("Identical", "l"), ("$n$", "r")],
        label="tab:speculative",
        caption=("Speculative decoding over the cache policies (greedy, verified in one forward per block). Speedup: "
                 "tokens/s over spec none's under the same policy; mean accepted length: tokens per verification "
                 "forward; identical: the generated ids equal spec none's (from the stored hashes). Mean $\\pm$ std "
                 f"over the $n$ repeats ({devices})."))
    for policy, block in rows_in.groupby(rows_in.apply(_policy_name, axis=1), sort=False):
        rows, notes = [], []
        for row in block.itertuples():
            what = f"configuration {row.group_hash}"
            reference = row.spec == "none"
            rows.append([
                "", escape(row.spec), "--" if reference else str(row.num_draft),
                mean_std(row.tokens_per_s, row.tokens_per_s_std, row.n, 1, what=f"tokens/s of {what}"),
                r"\textit{ref.}" if reference else f"${number(row.speedup, 2, what=f'speedup of {what}')}\\times$",
                "--" if reference else f"${number(row.acceptance_rate, 2, what=f'acceptance of {what}')}$",
                f"${number(row.mean_accepted_length, 2, what=f'accepted length of {what}')}$",
                "yes" if bool(row.identical) else "no", str(row.n)])
            notes.append(f"group {row.group_hash}")
        rows[0][0] = policy
        table.add_panel(None, rows, notes)
    return table.render()


def _policy_name(row) -> str:
    if row.method != "streaming":
        return method_name(row)
    stale = STALE_MARK if row.stale else ""
    return f"{method_name(row)}{stale} ({knob('compress_every', row.compress_every)}, {knob('cap', row.cap)})"


def findings_text(gathered: Gathered) -> str:
    """The main results in words, an effect called resolved only when its 95 % interval excludes zero: one sentence per
    setting of the main table, then every setting of the ablations and sweeps whose ΔPPL interval excludes zero."""
    main = merge_equivalent(_sorted(gathered.experiments[MAIN]))
    sentences = []
    for row in main[~main.is_baseline].itertuples():
        what = f"setting {row.setting_hash}"
        label = row_label(row, ["compress_every"])
        speed = f"${number(row.speedup, 2, what=f'speedup of {what}')}\\times$"
        pace = f"decodes {speed} faster" if row.speedup >= 1 else f"decodes slower (speedup {speed})"
        delta = paired_cell(row.delta_ppl_pct, row.delta_ppl_low, row.delta_ppl_high, int(row.n_pairs),
                            bool(row.delta_ppl_resolved), what=f"delta PPL of {what}")
        if int(row.n_pairs) < 2:
            verdict = "one text sample, so no interval: the effect is not resolved"
        elif row.delta_ppl_resolved:
            verdict = "resolved: the interval excludes zero"
        else:
            verdict = "not resolved: the interval includes zero"
        sentences.append(f"{label} {pace} per token than recompute; its $\\Delta$PPL is {delta}\\,\\% "
                         f"over {int(row.n_pairs)} text samples ({verdict}).")
    others = pd.concat([gathered.experiments[name] for name in (LADDER, *SWEEPS)])
    # Settings of the main table are said above; a setting is listed once (a stale twin has its own code version).
    others = others[~others.is_baseline & ~others.setting_hash.isin(main.setting_hash)].drop_duplicates(
        ["setting_hash", "code_version"])
    resolved = merge_equivalent(_sorted(others[others.delta_ppl_resolved]))
    if resolved.empty:
        tail = ("No setting of the ablation ladder or the sweeps has a $\\Delta$PPL whose 95\\,\\% interval excludes "
                "zero.")
    else:
        listed = "; ".join(
            f"{row_label(row, ['compress_every', 'cap_mode', 'sink', 'slack', 'max_drop'])}: "
            + paired_cell(row.delta_ppl_pct, row.delta_ppl_low, row.delta_ppl_high, int(row.n_pairs), True,
                          what=f"delta PPL of setting {row.setting_hash}") + "\\,\\%"
            for row in resolved.itertuples())
        tail = f"Resolved $\\Delta$PPL in the ablations and sweeps (95\\,\\% interval excludes zero): {listed}."
    intro = (f"Intervals are 95\\,\\% Student-$t$ intervals over the text samples ($t_{{0.975,n-1}}\\,s/\\sqrt{{n}}$, "
             f"grid {escape(gathered.grid)}); an effect is called resolved only when its interval excludes zero.")
    return "\n\n".join([intro, " ".join(sentences), tail]) + "\n"


def profile_table(gathered: Gathered) -> str:
    profile = gathered.profile
    table = Table(columns=[("Configuration", "l"), ("Compactions", "r"), ("Forward (ms)", "r"),
                           ("Compaction (ms)", "r"), ("Total (ms)", "r"), ("$n$", "r")], label="tab:profile",
                  caption="Cost per decoded token, strict vs lazy (timed steps; forward includes cache updates). Mean "
                          "$\\pm$ std over the $n$ repeats.")
    rows = [[row.label, mean_std(row.compactions, row.compactions_std, row.n, 1, what="compactions"),
             mean_std(row.forward_ms, row.forward_ms_std, row.n, 3, what="forward ms"),
             mean_std(row.compaction_ms, row.compaction_ms_std, row.n, 3, what="compaction ms"),
             mean_std(row.total_ms, row.total_ms_std, row.n, 3, what="total ms"), str(row.n)]
            for row in profile.itertuples()]
    table.add_panel(None, rows, [f"setting {row.setting_hash}" for row in profile.itertuples()])
    return table.render()


def quantization_table(groups: pd.DataFrame, failed: pd.DataFrame) -> str:
    columns = [("Configuration", "l"), ("PPL", "r"), (r"$\Delta$PPL vs float (\%)", "r"), ("TPOT (ms)", "r"),
               ("TPOT ratio", "r"), ("KV B/token", "r"), ("Weights (MiB)", "r"), ("$n_r$", "r"), ("$n_t$", "r")]
    table = Table(columns=columns, label="tab:quantization", caption=(
        "Quantization: KV-cache codes (kv\\_quant; sinks kept full or quantized) and torchao weights "
        "(weight\\_quant). $\\Delta$PPL is paired per text sample with the same policy in float on the same tokens "
        f"({INTERVAL_NOTE}); the TPOT ratio is over the float policy's TPOT on the same tokens; KV bytes per token and "
        "weight bytes are measured (nbytes of every tensor held). TPOT mean $\\pm$ std over the $n_r$ timing "
        "repeats, PPL over the $n_t$ text samples; failed configurations are listed with their reason."))
    for compress_every, block in groups.groupby("compress_every", sort=True):
        block = block.sort_values(["weight_quant", "kv_quant", "kv_quant_sinks"])
        rows = []
        for row in block.itertuples():
            what = f"setting {row.setting_hash}"
            floating = row.kv_quant == "none" and row.weight_quant == "none"
            delta = r"\textit{ref.}" if floating else paired_cell(
                row.delta_float_pct, row.delta_float_low, row.delta_float_high, row.n_float_pairs,
                row.delta_float_resolved, what=f"delta PPL vs float of {what}")
            ratio = r"\textit{ref.}" if floating else \
                f"${number(row.tpot_ratio, 2, what=f'TPOT ratio of {what}')}\\times$"
            rows.append([
                _quant_label(row), mean_std(row.ppl, row.ppl_std, row.n_samples, 3, what=f"PPL of {what}"), delta,
                mean_std(row.tpot_ms, row.tpot_ms_std, row.n_repeats, 2, what=f"TPOT of {what}"), ratio,
                f"${number(row.kv_bytes_per_token, 0, what=f'KV bytes of {what}')}$",
                f"${number(row.weights_bytes / 2**20, 1, what=f'weights bytes of {what}')}$", *n_cells(row)])
        lost = failed[failed.compress_every == compress_every]
        for row in lost.itertuples():
            reason = escape(str(row.error).strip().splitlines()[0][:90]) if isinstance(row.error, str) else "unknown"
            rows.append([f"{_quant_label(row)}: \\textit{{failed}} ({reason})", *["---"] * 6, "0", "0"])
        notes = [f"setting {row.setting_hash}" for row in block.itertuples()] + [f"run {row.run_hash}"
                                                                                 for row in lost.itertuples()]
        table.add_panel(rf"\emph{{{knob('compress_every', compress_every)}}}", rows, notes)
    return table.render()


def _quant_label(row) -> str:
    kv = escape(row.kv_quant) if row.kv_quant == "none" or row.kv_quant_sinks == "full" else \
        f"{escape(row.kv_quant)}, sinks quantized"
    return f"KV {kv}; weights {escape(row.weight_quant)}"


def retrieval_table(cells: pd.DataFrame) -> str:
    """The retrieval experiment: per setting, context length and needle depth, the accuracy with its Wilson 95 %
    interval, the mean answer NLL, the needle's distance and retained tokens, and n (trials)."""
    table = Table(
        columns=[("Setting", "p{4.2cm}"), ("Ctx", "r"), ("Depth", "r"), ("Dist.", "r"), ("Ret.", "r"),
                 ("Accuracy [95 \\% CI]", "l"), ("Ans. NLL", "r"), ("$n$", "r")],
        label="tab:retrieval",
        caption=("What the cache recalls: the passkey (or the task named) recovered by greedy generation after the "
                 "context went through each cache, per needle depth (the fraction of the haystack before it). Dist.: "
                 "tokens from the needle's end to the question; Ret.: the needle's tokens the cache still held when "
                 "the question started (mean, from the schedule); accuracy: mean RULER score with its Wilson 95 \\% "
                 "interval over the $n$ trials; Ans.\\ NLL: mean teacher-forced NLL of the gold answer (nats per "
                 "token)."))
    for setting, block in cells.groupby("setting", sort=False):
        rows, notes = [], []
        for row in block.itertuples():
            what = f"configuration {row.group_hash} at depth {row.depth}"
            depth = "file" if pd.isna(row.depth) else f"{row.depth:g}"
            retained = "--" if pd.isna(row.retained) else number(row.retained, 0, what=f"retained of {what}")
            distance = "--" if pd.isna(row.distance) else number(row.distance, 0, what=f"distance of {what}")
            accuracy = (f"${number(row.accuracy, 2, what=f'accuracy of {what}')}$ "
                        f"[{number(row.accuracy_low, 2, what=f'interval of {what}')}, "
                        f"{number(row.accuracy_high, 2, what=f'interval of {what}')}]")
            rows.append(["", str(row.context_tokens), depth, distance, retained, accuracy,
                         f"${number(row.answer_nll, 2, what=f'answer NLL of {what}')}$", str(row.trials)])
            notes.append(f"group {row.group_hash}")
        rows[0][0] = escape(setting) + (STALE_MARK if block.stale.any() else "")
        table.add_panel(None, rows, notes)
    return table.render()
