"""The engine's rooms: one-way imports, one run kernel for both protocols (its checks and its environment), model
loading in its own module, storage strategies behind one contract."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import streaming_llm
from streaming_llm import ConfigError, LoadedModel, RunConfig, StreamingCache, StreamingPolicy, evaluate
from streaming_llm.quant import KVQuantizer
from streaming_llm.rope import RotaryGeometry, rotate_keys
from streaming_llm.storage import KVQuantSpec, PreRopeFloatStorage, QuantizedStorage, RealignedFloatStorage
from tests.conftest import TEST_DEVICE

PACKAGE = Path(streaming_llm.__file__).resolve().parent


def engine_imports() -> dict[str, set[str]]:
    """For each module of streaming_llm, the package's modules it imports (at the top or inside a function)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    imported.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import x
                    imported.update(alias.name for alias in node.names)
                elif node.level == 0 and node.module and node.module.startswith("streaming_llm."):
                    imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[1] for alias in node.names
                                if alias.name.startswith("streaming_llm."))
        graph[path.stem] = imported - {path.stem}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, ())):
            circle = visit(imported, [*path, module])
            if circle:
                return circle
        done.add(module)
        return None

    for module in sorted(graph):
        circle = visit(module, [])
        if circle:
            return circle
    return None


def test_the_engine_imports_one_way():
    graph = engine_imports()
    graph.pop("__init__")  # the package's front door imports the rooms; no room imports it
    assert find_circle(graph) is None, f"import circle: {' -> '.join(find_circle(graph))}"
    assert "score" not in graph["generate"] and "generate" not in graph["score"]  # the protocols, side by side
    assert "evaluate" not in set().union(*(graph[module] for module in graph if module != "__main__"))


def package_imports(package: str) -> dict[str, set[str]]:
    """For each module of `package` (a folder of the project, sub-packages included), the package's modules it imports
    (relative or absolute, at the top or inside a function), as dotted names inside the package."""
    root = PACKAGE.parent / package
    modules = {".".join(path.relative_to(root).with_suffix("").parts): path for path in sorted(root.rglob("*.py"))}
    modules = {name.removesuffix(".__init__") if name != "__init__" else "": path for name, path in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name != "__init__.py" else [*name.split("."), "__init__"]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = [part for part in here[: len(here) - node.level] if part]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                    targets = [module, *(f"{module}.{alias.name}".strip(".") for alias in node.names)]
                elif node.module and (node.module == package or node.module.startswith(package + ".")):
                    module = node.module.removeprefix(package).lstrip(".")
                    targets = [module, *(f"{module}.{alias.name}".strip(".") for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name.removeprefix(package).lstrip(".") for alias in node.names
                           if alias.name.startswith(package + ".")]
            imported.update(target for target in targets if target in modules)
        graph[name] = imported - {name}
    return graph


@pytest.mark.parametrize("package", ["streaming_llm", "store", "gridrun", "paper", "dashboard"])
def test_every_package_imports_one_way(package):
    graph = package_imports(package)
    graph.pop("", None)  # a package's front door may import its rooms; no room imports it
    assert find_circle(graph) is None, f"import circle in {package}/: {' -> '.join(find_circle(graph))}"


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


# --- one start / finish for both protocols ----------------------------------------------------------------------------
GENERATE = dict(attn_implementation="eager", device=TEST_DEVICE, mode="generate", prompt_tokens=48, new_tokens=12)


def test_a_generation_run_records_the_environment_a_score_run_does(tiny_models):
    loaded = tiny_models["tiny-llama"]
    generated = evaluate(RunConfig(model="tiny-llama", method="streaming", sink=4, window=24, **GENERATE),
                         loaded=loaded)
    scored = evaluate(RunConfig(model="tiny-llama", method="streaming", sink=4, window=24, max_tokens=64,
                                attn_implementation="eager", device=TEST_DEVICE), loaded=loaded)
    assert generated.summary["environment"]["weight_quant_backend"] == "none"
    assert generated.summary["environment"].keys() == scored.summary["environment"].keys()
    for key in ("peak_memory_bytes", "peak_memory_kind", "started_at", "ended_at", "wall_s"):
        assert generated.summary[key] is not None and scored.summary[key] is not None


def test_a_generation_run_with_a_non_finite_nll_fails_naming_the_step():
    """The engine fails it (before, only the grid worker's second copy of the check did)."""
    loaded = LoadedModel.load(RunConfig(model="tiny-llama", method="dense", attn_implementation="eager", device="cpu"))
    config = RunConfig(model="tiny-llama", method="streaming", sink=4, window=24, **{**GENERATE, "device": "cpu"})
    prompt = evaluate(config, loaded=loaded).tokens.column("token_id").to_numpy()[:40]
    poisoned = int(prompt[20])
    first = int(np.flatnonzero(prompt == poisoned)[0])
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[poisoned] = float("nan")
    with pytest.raises(FloatingPointError, match=f"NLL is nan at step {first} "):
        evaluate(config, loaded=loaded)


def test_each_protocol_refuses_the_other_mode(tiny_models):
    from streaming_llm.generate import generate
    from streaming_llm.score import score

    scored = RunConfig(model="tiny-llama", method="dense", max_tokens=32, device=TEST_DEVICE)
    with pytest.raises(ValueError, match="call evaluate"):
        generate(scored, loaded=tiny_models["tiny-llama"])
    with pytest.raises(ValueError, match="call evaluate"):
        score(RunConfig(model="tiny-llama", method="dense", **GENERATE), loaded=tiny_models["tiny-llama"])


def test_the_knob_check_that_needs_the_model_runs_before_its_weights_load(monkeypatch):
    """Where the weights load now (streaming_llm.models): kv_quant_group | head_dim is checked first."""
    import streaming_llm.models as models

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the check")

    monkeypatch.setattr(models, "load_model", no_weights)
    config = RunConfig(model="tiny-neox", method="streaming", sink=4, window=24, kv_quant="int4", kv_quant_group=32,
                       device="cpu")
    with pytest.raises(ConfigError, match=r"does not divide head_dim = 16"):
        LoadedModel.load(config)


# --- the storage seam -------------------------------------------------------------------------------------------------
class RecordingStorage(RealignedFloatStorage):
    """The realign float storage, counting the calls the cache makes through the storage contract."""

    def __init__(self, geometry: RotaryGeometry, num_layers: int):
        super().__init__(geometry, num_layers)
        self.calls: Counter[str] = Counter()

    def append(self, layer, start, key_states, value_states) -> None:
        self.calls["append"] += 1
        super().append(layer, start, key_states, value_states)

    def move(self, move) -> None:
        self.calls["move"] += 1
        super().move(move)

    def reserve(self, needed, length) -> bool:
        self.calls["reserve"] += 1
        return super().reserve(needed, length)


def test_a_storage_plugs_into_the_cache_through_its_contract_alone(tiny_models):
    """A storage the cache was not written for (a third strategy) is used through the contract: same logits, bit for
    bit, as the storage the cache picks itself, and every append and move goes through it."""
    model = tiny_models["tiny-llama"].model
    policy = StreamingPolicy(sink=4, window=16, compress_every=4)
    geometry, layers = RotaryGeometry.of(model), model.config.num_hidden_layers
    recording = RecordingStorage(geometry, layers)
    caches = [StreamingCache(policy, geometry, layers, "realign"),
              StreamingCache(policy, geometry, layers, "realign", storage=recording)]
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.inference_mode():
        for step in range(60):
            plain, injected = (model(input_ids=ids[:, step : step + 1], cache=cache,
                                     position_ids=cache.next_positions(1, model.device)).logits for cache in caches)
            torch.testing.assert_close(injected, plain, rtol=0, atol=0)
    assert recording.calls["append"] == 60 * layers and recording.calls["move"] > 0 and recording.calls["reserve"]
    assert caches[1].peak_nbytes == caches[0].peak_nbytes and caches[1].quantized is None


def test_a_cache_takes_a_quantization_or_a_storage_not_both(tiny_models):
    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    policy = StreamingPolicy(sink=4, window=16)
    with pytest.raises(ValueError, match="not both"):
        StreamingCache(policy, geometry, 2, "realign", kv_quant=KVQuantSpec(KVQuantizer(8, 8)),
                       storage=RecordingStorage(geometry, 2))
    assert isinstance(StreamingCache(policy, geometry, 2, "exact").storage, PreRopeFloatStorage)
    assert isinstance(StreamingCache(policy, geometry, 2, "absolute", kv_quant=KVQuantSpec(KVQuantizer(8, 8))).storage,
                      QuantizedStorage)


# --- rollback, a cache method -----------------------------------------------------------------------------------------
def _feed_one(cache: StreamingCache, geometry: RotaryGeometry, generator: torch.Generator, precise: bool):
    """One step of random entries (keys rotated at the cache's next position, as a model would): what each of the
    cache's two layers attended."""
    keys, values = torch.randn(2, 2, 1, 2, 1, 16, generator=generator)
    cos, sin = geometry.cos_sin(cache.next_positions(1)[0], torch.device("cpu"), precise=precise)
    keys = rotate_keys(keys, cos, sin)
    return [cache.update(keys[layer], values[layer], layer) for layer in range(2)]


def _until_a_compaction(cache: StreamingCache, geometry: RotaryGeometry, generator: torch.Generator, precise: bool):
    for _ in range(200):
        _feed_one(cache, geometry, generator, precise)
        if cache.last_plan is not None:
            cache.compact_pending()
            return
    raise AssertionError("no compaction in 200 steps")


def _contents(cache: StreamingCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys_to_attend().clone(), layer.values_to_attend().clone()) for layer in cache.layers]


@pytest.mark.parametrize("rope_mode", ["realign", "exact", "absolute"])
def test_drop_newest_restores_a_float_cache_exactly(tiny_models, rope_mode):
    """Dropped tokens that no compaction touched: the cache is as before them, and fed the same tokens again attends
    exactly what it attended the first time."""
    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    cache = StreamingCache(StreamingPolicy(sink=4, window=16, compress_every=6), geometry, 2, rope_mode)
    _until_a_compaction(cache, geometry, torch.Generator().manual_seed(1), False)
    before, tokens_seen, length = _contents(cache), cache.tokens_seen, cache.layers[0].length
    first = [_feed_one(cache, geometry, torch.Generator().manual_seed(2), False) for _ in range(4)]
    assert cache.last_plan is None and cache.layers[0].length == length + 4  # nothing compacted meanwhile
    cache.drop_newest(4)
    assert cache.tokens_seen == tokens_seen and [layer.length for layer in cache.layers] == [length, length]
    for (keys, values), (keys_before, values_before) in zip(_contents(cache), before, strict=True):
        torch.testing.assert_close(keys, keys_before, rtol=0, atol=0)
        torch.testing.assert_close(values, values_before, rtol=0, atol=0)
    again = [_feed_one(cache, geometry, torch.Generator().manual_seed(2), False) for _ in range(4)]
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.parametrize("dropped", [1, 5])  # within the float residual, and past it into the codes
def test_drop_newest_on_a_quantized_cache_drops_floats_then_codes(tiny_models, dropped):
    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    spec = KVQuantSpec(KVQuantizer(8, 8), residual=2)
    cache = StreamingCache(StreamingPolicy(sink=4, window=16, compress_every=8), geometry, 2, "realign", kv_quant=spec)
    _until_a_compaction(cache, geometry, torch.Generator().manual_seed(1), True)
    before, tokens_seen, length = _contents(cache), cache.tokens_seen, cache.layers[0].length
    first = [_feed_one(cache, geometry, torch.Generator().manual_seed(2), True) for _ in range(dropped)]
    assert cache.last_plan is None
    cache.drop_newest(dropped)
    assert cache.tokens_seen == tokens_seen and cache.layers[0].length == length
    held_as_codes = cache.quantized.quantized[0]
    assert held_as_codes <= length - 4  # the sinks stay floats; the rest is codes then floats, no slot beyond length
    for layer, ((keys, values), (keys_before, values_before)) in enumerate(zip(_contents(cache), before, strict=True)):
        # Floats of `before` that aged into codes meanwhile are within half a quantization step of what they were.
        key_step = cache.quantized.step_sizes(layer, length)[..., None]
        value_step = cache.quantized.step_sizes(layer, length, values=True)[..., None]
        assert ((keys - keys_before).abs() <= key_step / 2 * (1 + 1e-4) + 1e-5).all()
        assert ((values - values_before).abs() <= value_step / 2 * (1 + 1e-4) + 1e-6).all()
    again = [_feed_one(cache, geometry, torch.Generator().manual_seed(2), True) for _ in range(dropped)]
    assert cache.layers[0].length == length + dropped and cache.tokens_seen == tokens_seen + dropped
    for step_again, step_first in zip(again, first, strict=True):
        for (keys, values), (keys_first, values_first) in zip(step_again, step_first, strict=True):
            assert (keys - keys_first).abs().max() < 0.1 and (values - values_first).abs().max() < 0.1


def test_drop_newest_refuses_a_negative_count(tiny_models):
    cache = StreamingCache(StreamingPolicy(sink=4, window=16), RotaryGeometry.of(tiny_models["tiny-llama"].model), 2)
    with pytest.raises(ValueError, match=r"drop_newest\(-1\)"):
        cache.drop_newest(-1)


def test_the_draft_cache_is_rolled_back_through_the_cache(tiny_models, monkeypatch):
    """speculative's self_stream drafter rolls its StreamingCache back with the cache's own method."""
    from streaming_llm.speculative import drop_newest

    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    cache = StreamingCache(StreamingPolicy(sink=4, window=16), geometry, 2)
    calls: list[int] = []
    monkeypatch.setattr(cache, "drop_newest", calls.append)
    drop_newest(cache, 3)
    assert calls == [3]
