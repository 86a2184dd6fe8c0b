"""Grid files: YAML -> validated spec -> one normalised RunConfig per distinct run, with the experiments it belongs to.

Pure: reads the grid file and nothing else; never starts a run or touches the store. Every error names the file, the
experiment, the key and what is allowed.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streaming_llm import ConfigError, RunConfig

GRID_ONLY_KEYS = ("repeats",)  # knobs of the grid, not of a run: `repeats: n` expands to repeat = 0 .. n-1
KNOWN_KEYS = (*RunConfig.model_fields, *GRID_ONLY_KEYS)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# What a grid file may ask of the parser, so that a hostile file is refused in bounded time and memory.
MAX_GRID_BYTES = 1 << 20  # a grid is a page of YAML; 1 MiB is far past any real one
MAX_DEPTH = 16  # nesting of mappings and lists (a grid needs 4: experiments > name > runs > run)
MAX_VALUES = 100_000  # scalars, mappings and lists after anchors and aliases are expanded
MAX_REPEATS = 1_000
MAX_RUNS = 10_000  # runs one grid file expands to, repeats included


class GridError(ValueError):
    """An invalid grid file or override; the message names the file, the experiment, the key and the fix."""


class ExperimentSpec(BaseModel):
    """One experiment: `base` overrides, then the cartesian product of `grid`, crossed with the explicit `runs`, each
    measured as each of the grid's `measurements` it names (default: all of them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    runs: list[dict[str, Any]] = Field(default_factory=list)
    measurements: list[str] | None = None


class GridSpec(BaseModel):
    """A grid file: its `name`, `base` knobs shared by every run, named `measurements` and named experiments.

    A measurement is how each configuration is measured: knobs laid over every run of an experiment (after its base,
    runs and grid), a list value expanding to one run per value. E.g. `quality: {protocol: parallel, sample: [0, 1, 2,
    3, 4]}` and `timing: {protocol: stepwise, repeats: 3}` measure each configuration once over five texts and once
    over three timed repeats; the query layer joins them per setting.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    measurements: dict[str, dict[str, Any]] = Field(default_factory=dict)
    experiments: dict[str, ExperimentSpec] = Field(min_length=1)


@dataclass(frozen=True)
class PlannedConfig:
    """A configuration of the grid (its own knobs) and the experiments that list it (in file order)."""

    config: RunConfig
    experiments: tuple[str, ...]


@dataclass(frozen=True)
class PlannedRun:
    """A distinct run of the grid and every experiment that lists it (in file order).

    `configs` are the configurations that map to it: equivalent ones (the same schedule fingerprint) share the run,
    and `config`, the first of them in file order, is the one run.
    """

    config: RunConfig
    experiments: tuple[str, ...]
    configs: tuple[PlannedConfig, ...] = ()

    @property
    def run_hash(self) -> str:
        return self.config.run_hash

    def configurations(self) -> tuple[PlannedConfig, ...]:
        return self.configs or (PlannedConfig(self.config, self.experiments),)


@dataclass(frozen=True)
class Grid:
    """An expanded grid: distinct runs in file order, each once, and the experiments in file order."""

    name: str
    path: Path
    spec_yaml: str
    experiments: tuple[str, ...]
    runs: tuple[PlannedRun, ...]

    def membership(self) -> list[tuple[str, str]]:
        """(experiment, run_hash) pairs: a run listed by several experiments belongs to each."""
        return [(experiment, run.run_hash) for run in self.runs for experiment in run.experiments]

    def configurations(self) -> list[tuple[str, RunConfig]]:
        """(experiment, configuration) pairs: every configuration each experiment lists, equivalent ones included."""
        return [(experiment, planned.config) for run in self.runs for planned in run.configurations()
                for experiment in planned.experiments]

    def equivalences(self) -> list[Equivalence]:
        """Configurations that share a computation, one entry per group of repeats (see `Equivalence`)."""
        groups: dict[str, list[PlannedRun]] = {}
        for run in self.runs:
            if len(run.configurations()) > 1:
                groups.setdefault(run.config.group_hash, []).append(run)
        return [Equivalence(tuple(p.config for p in runs[0].configurations()), len(runs)) for runs in groups.values()]

    def only(self, experiments: list[str]) -> Grid:
        """The runs of the named experiments (a run shared with other experiments keeps all its memberships)."""
        unknown = [name for name in experiments if name not in self.experiments]
        if unknown:
            raise GridError(
                f"{self.path}: --only {', '.join(unknown)}: no such experiment (known: {', '.join(self.experiments)})"
            )
        runs = tuple(run for run in self.runs if set(run.experiments) & set(experiments))
        return Grid(self.name, self.path, self.spec_yaml, self.experiments, runs)

    def where(self, conditions: list[str]) -> Grid:
        """The runs whose knobs hold every `key=value` of `conditions` (--where; values read as --set reads them), e.g.
        protocol=stepwise: a grid's timing runs alone, to re-measure them on an idle machine with --force."""
        wanted = parse_overrides(conditions, flag="--where")
        grid_only = [key for key in wanted if key not in RunConfig.model_fields]
        if grid_only:
            raise GridError(f"--where {grid_only[0]}: a key of the grid file, not of a run: select by repeat instead")
        for key, value in wanted.items():
            _check_knob_type(key, value, "--where")
        runs = tuple(run for run in self.runs
                     if all(_same_value(getattr(run.config, key), value) for key, value in wanted.items()))
        if not runs:
            raise GridError(f"{self.path}: --where {' '.join(conditions)}: no run of the grid (of the --only "
                            "experiments, when given) has those values")
        return Grid(self.name, self.path, self.spec_yaml, self.experiments, runs)


def _check_knob_type(key: str, value: Any, flag: str) -> None:
    """`value` is of the type knob `key` takes, as strictly as a grid file's values are checked (false is not 0, 1 is
    not 1.0's string, a Literal knob lists its values)."""
    try:
        TypeAdapter(RunConfig.model_fields[key].annotation).validate_python(value, strict=True)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise GridError(f"{flag} {key}={value!r}: {problem} (the type of {key} in a grid file)") from None


def _same_value(knob: Any, wanted: Any) -> bool:
    """Equal and of the same kind: True == 1 in Python, but a knob holding 1 is not one holding true."""
    return knob == wanted and isinstance(knob, bool) == isinstance(wanted, bool)


@dataclass(frozen=True)
class Equivalence:
    """Configurations with the same kept tokens at every step: one computation, run `runs` times (its repeats)."""

    configs: tuple[RunConfig, ...]
    runs: int

    def differing(self) -> list[str]:
        """The knobs whose value differs between the configurations."""
        dumps = [config.normalised() for config in self.configs]
        return [key for key in dumps[0] if len({repr(d[key]) for d in dumps}) > 1]

    def describe(self) -> str:
        """'overlap=8 ≡ overlap=0 (same kept tokens at every step): 1 run'. The configuration that is run comes last
        with every differing knob; the others show the knobs in which they differ from it."""
        run, others = self.configs[0].normalised(), [config.normalised() for config in self.configs[1:]]
        shown = [", ".join(f"{k}={v}" for k, v in other.items() if repr(v) != repr(run[k])) for other in others]
        shown.append(", ".join(f"{k}={run[k]}" for k in self.differing()))
        runs = f"{self.runs} run" + ("s" if self.runs > 1 else "")
        return f"{' ≡ '.join(shown)} (same kept tokens at every step): {runs}"


def load_grid(path: Path | str, overrides: list[str] | None = None) -> Grid:
    """Read, validate and expand a grid file; `overrides` are `key=value` strings applied to every run (--set)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_GRID_BYTES + 1)
    except OSError as exc:
        raise GridError(f"{path}: cannot read the grid file ({exc.strerror}): check the path") from None
    if len(data) > MAX_GRID_BYTES:
        raise GridError(f"{path}: larger than {MAX_GRID_BYTES:,} bytes: a grid file is a page of YAML; check the path")
    return parse_grid(decode_grid_text(data, path), path, overrides or [])


def decode_grid_text(data: bytes, path: Path) -> str:
    """The file as text: UTF-8 (a UTF-8 byte-order mark is allowed); anything else is refused with where it breaks."""
    for bom, encoding in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                          (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if data.startswith(bom):
            raise GridError(f"{path}: the file is {encoding} (it starts with a byte-order mark): save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise GridError(f"{path}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 (a Latin-1 or other legacy "
                        "encoding?): save the file as UTF-8") from None
    if "\x00" in text:
        raise GridError(f"{path}: the file holds NUL characters (a binary file, or UTF-16 without a byte-order mark?): "
                        "save it as UTF-8 text")
    return text


def parse_grid(text: str, path: Path, overrides: list[str]) -> Grid:
    data = _load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid file is a mapping with name, base and experiments (got {type(data).__name__})")
    try:
        spec = GridSpec(**data)
    except ValidationError as exc:
        raise GridError(f"{path}: {_describe(exc)}") from None
    forced = parse_overrides(overrides)
    _check_keys(spec.base, f"{path}: base")
    for measurement, knobs in spec.measurements.items():
        if re.match(NAME_PATTERN, measurement) is None:
            raise GridError(f"{path}: measurement name {measurement!r}: use letters, digits, '_', '.', '-'")
        _check_keys(knobs, f"{path}: measurement '{measurement}'")
        for key, value in knobs.items():
            if isinstance(value, list) and (not value or len({repr(v) for v in value}) != len(value)):
                raise GridError(f"{path}: measurement '{measurement}': {key} = {value}: list each value once, "
                                "at least one")
    for name, experiment in spec.experiments.items():
        if re.match(NAME_PATTERN, name) is None:
            raise GridError(f"{path}: experiment name {name!r}: use letters, digits, '_', '.', '-' ({NAME_PATTERN})")
        _check_experiment(experiment, f"{path}: experiment '{name}'")
        unknown = [m for m in experiment.measurements or [] if m not in spec.measurements]
        if unknown:
            raise GridError(f"{path}: experiment '{name}' measurements: {', '.join(unknown)} not defined (the grid's "
                            f"measurements: {', '.join(spec.measurements) or 'none'})")

    # Counted before anything is expanded; then every run is validated before any is hashed (hashing resolves
    # cap_mode peak windows and simulates each schedule: the costly part), so a bad run is refused in seconds.
    _check_run_count(spec, forced, path)
    validated = [(name, config) for name, experiment in spec.experiments.items()
                 for config in _expand(spec, name, experiment, forced, path)]
    # run hash -> config hash -> (configuration, experiments listing it), in file order
    planned: dict[str, dict[str, tuple[RunConfig, list[str]]]] = {}
    for name, config in validated:
        configs = planned.setdefault(config.run_hash, {})
        owners = configs.setdefault(config.config_hash, (config, []))[1]
        if name not in owners:
            owners.append(name)
    runs = tuple(_planned_run(configs, list(spec.experiments)) for configs in planned.values())
    grid_name = spec.name if not overrides else f"{spec.name}[{','.join(overrides)}]"
    return Grid(grid_name, path, text, tuple(spec.experiments), runs)


def _planned_run(configs: dict[str, tuple[RunConfig, list[str]]], order: list[str]) -> PlannedRun:
    members = tuple(PlannedConfig(config, tuple(owners)) for config, owners in configs.values())
    experiments = tuple(sorted({name for member in members for name in member.experiments}, key=order.index))
    return PlannedRun(members[0].config, experiments, members)


def _load_yaml(text: str, where: str) -> Any:
    """Safe YAML with bounded nesting and bounded alias expansion; errors become one-line GridErrors."""
    if _flow_depth(text) > MAX_DEPTH:  # PyYAML's scanner reads a whole flow collection ahead: refuse it unread
        raise GridError(f"{where}: not valid YAML: nested more than {MAX_DEPTH} levels deep: a grid needs 4")
    try:
        data = yaml.load(text, Loader=_SafeUniqueKeyLoader)  # a SafeLoader: it builds no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise GridError(f"{where}: not valid YAML: {at}{problem}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise GridError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    _check_size(data, where)
    return data


_QUOTED_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\']|\'\')*\'|(?:^|(?<=\s))#[^\n]*', re.MULTILINE)


def _flow_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """How deep `[` and `{` nest outside quotes and comments (counting stops just past `limit`)."""
    depth = 0
    for bracket in re.finditer(r"[\[\]{}]", _QUOTED_OR_COMMENT.sub("", text)):
        depth = depth + 1 if bracket.group() in "[{" else max(depth - 1, 0)
        if depth > limit:
            break
    return depth


def _check_size(data: Any, where: str) -> None:
    """Count values as a reader of the expanded document would see them (aliases count each time they are used):
    `&a [*b, *b, ...]` chains (YAML bombs) and recursive aliases are refused before anything walks them."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise GridError(f"{where}: the document expands to more than {MAX_VALUES:,} values (anchors and aliases "
                            "that nest or refer to themselves?): write the grid out without them")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class _SafeUniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error (safe_load silently keeps the last one), nesting
    deeper than MAX_DEPTH is refused (it would exhaust Python's stack). Merge keys (`<<: *defaults`) work: keys given
    beside them override the merged ones, as YAML defines."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep: a grid "
                                                  "needs 4", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice: keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_overrides(overrides: list[str], flag: str = "--set") -> dict[str, Any]:
    """`key=value` strings (values read as YAML scalars: 64, true, null, soft) into knobs; `flag` names the option in
    messages."""
    forced: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GridError(f"{flag} {item!r}: expected key=value, e.g. {flag} max_tokens=256")
        if key not in KNOWN_KEYS:
            raise GridError(f"{flag} {key}: unknown key (allowed: {', '.join(KNOWN_KEYS)})")
        try:
            forced[key] = _load_yaml(value, f"{flag} {key}")
        except GridError:
            raise GridError(f"{flag} {item!r}: the value is not a YAML scalar (e.g. 64, true, null, soft)") from None
        if isinstance(forced[key], (dict, list)):
            raise GridError(f"{flag} {item!r}: the value is not a YAML scalar (e.g. 64, true, null, soft)")
    return forced


def _check_run_count(spec: GridSpec, forced: dict[str, Any], path: Path) -> None:
    """Refuse a grid that would expand to more than MAX_RUNS runs, before expanding anything: the count is computed
    from the lists' lengths (grid lists and each measurement's lists multiply; repeats add up), never by listing
    runs, and each `repeats` value is checked on the way."""
    total = 0
    for name, experiment in spec.experiments.items():
        swept = {key: values for key, values in experiment.grid.items() if key != "repeats"}
        points = math.prod(len(values) for values in swept.values())
        for index, run in enumerate(experiment.runs or [{}]):
            where = f"{path}: experiment '{name}'" + (f" runs[{index}]" if experiment.runs else "")
            for overlays, measured_repeats in _measurement_counts(spec, experiment):
                if "repeats" in forced:
                    choices = [forced["repeats"]]
                elif measured_repeats is not None:
                    choices = measured_repeats
                elif "repeats" in experiment.grid:
                    choices = experiment.grid["repeats"]
                else:
                    choices = [{**spec.base, **experiment.base, **run}.get("repeats", 1)]
                for repeats in choices:
                    if type(repeats) is not int or not 1 <= repeats <= MAX_REPEATS:
                        raise GridError(f"{where}: repeats = {repeats!r}: repeats must be an integer >= 1 "
                                        f"(at most {MAX_REPEATS:,})")
                total += overlays * points * sum(choices)
                if total > MAX_RUNS:
                    raise GridError(f"{where}: the grid expands to more than {MAX_RUNS:,} runs (grid lists and "
                                    "measurement lists multiply, times repeats): split it into smaller grids or "
                                    "sweep fewer values")


def _measurement_counts(spec: GridSpec, experiment: ExperimentSpec) -> list[tuple[int, list[Any] | None]]:
    """Per measurement of the experiment: how many overlays it expands to apart from a `repeats` it lists, and the
    repeats values it sets (None: it sets none). One overlay of nothing when the experiment has no measurement."""
    names = list(spec.measurements) if experiment.measurements is None else experiment.measurements
    counts = []
    for name in names:
        knobs = spec.measurements[name]
        lengths = [len(value) for key, value in knobs.items() if isinstance(value, list) and key != "repeats"]
        repeats = knobs.get("repeats")
        counts.append((math.prod(lengths), None if "repeats" not in knobs else
                       repeats if isinstance(repeats, list) else [repeats]))
    return counts or [(1, None)]


def _expand(spec: GridSpec, name: str, experiment: ExperimentSpec, forced: dict[str, Any], path: Path):
    keys = list(experiment.grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*experiment.grid.values())]
    for index, run in enumerate(experiment.runs or [{}]):
        clash = set(run) & set(keys)
        if clash:
            raise GridError(
                f"{path}: experiment '{name}': runs[{index}] sets {', '.join(sorted(clash))}, which grid also sweeps: "
                "set it in one place only"
            )
        measures = _measure_points(spec, experiment)
        overlaid = set().union(*measures) & (set(experiment.base) | set(run) | set(keys))
        if overlaid:
            raise GridError(
                f"{path}: experiment '{name}'" + (f" runs[{index}]" if experiment.runs else "") + f" sets "
                f"{', '.join(sorted(overlaid))}, which its measurements also set: set it in one place (or give the "
                "experiment `measurements: []` and measure it its own way)"
            )
        for point, measure in itertools.product(points, measures):
            knobs = {**spec.base, **experiment.base, **run, **point, **measure, **forced}
            where = _where(path, name, index if experiment.runs else None, {**point, **measure})
            repeats = knobs.pop("repeats", 1)
            if type(repeats) is not int or repeats < 1:
                raise GridError(f"{where}: repeats = {repeats!r}: repeats must be an integer >= 1")
            if "repeat" in knobs and repeats > 1:
                raise GridError(f"{where}: both repeat and repeats are set: set repeats (it numbers the repeats)")
            for repeat in range(repeats):
                values = {**knobs, "repeat": repeat} if repeats > 1 else knobs
                try:
                    yield RunConfig.from_dict(values, where=where)
                except ConfigError as exc:
                    raise GridError(str(exc)) from None


def _measure_points(spec: GridSpec, experiment: ExperimentSpec) -> list[dict[str, Any]]:
    """The overlays of the experiment's measurements, list values expanded (one empty overlay when it has none)."""
    names = list(spec.measurements) if experiment.measurements is None else experiment.measurements
    overlays = []
    for name in names:
        knobs = spec.measurements[name]
        listed = {k: v for k, v in knobs.items() if isinstance(v, list)}
        for values in itertools.product(*listed.values()):
            overlays.append({**knobs, **dict(zip(listed, values, strict=True))})
    return overlays or [{}]


def _where(path: Path, experiment: str, run_index: int | None, point: dict[str, Any]) -> str:
    parts = [f"{path}: experiment '{experiment}'"]
    if run_index is not None:
        parts.append(f"runs[{run_index}]")
    if point:
        parts.append("grid point " + ", ".join(f"{k}={v}" for k, v in point.items()))
    return " ".join(parts)


def _check_experiment(experiment: ExperimentSpec, where: str) -> None:
    if not experiment.grid and not experiment.runs:
        raise GridError(f"{where}: has neither grid: nor runs: (for one run of its base, write runs: [{{}}])")
    _check_keys(experiment.base, f"{where} base")
    for key, values in experiment.grid.items():
        _check_keys({key: None}, f"{where} grid")
        if not values:
            raise GridError(f"{where} grid: {key} is an empty list: give at least one value")
        if len({repr(v) for v in values}) != len(values):
            raise GridError(f"{where} grid: {key} lists a value twice ({values}): list each value once")
    for index, run in enumerate(experiment.runs):
        _check_keys(run, f"{where} runs[{index}]")


def _check_keys(knobs: dict[str, Any], where: str) -> None:
    for key in knobs:
        if key not in KNOWN_KEYS:
            raise GridError(f"{where}: unknown key '{key}' (allowed: {', '.join(KNOWN_KEYS)})")


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' (a grid has name, description, base, experiments; an experiment has "
                         "description, base, grid, runs)")
        elif err["type"] == "missing":
            lines.append(f"'{key}' is missing")
        elif err["type"] == "string_pattern_mismatch":
            lines.append(f"{key} = {err.get('input')!r}: use letters, digits, '_', '.', '-' ({NAME_PATTERN})")
        else:
            lines.append(f"{key} = {err.get('input')!r}: {err['msg']}")
    return "; ".join(lines)

