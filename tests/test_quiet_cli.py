"""The command lines print nothing that is not about the user's run: no library start-up notices on stderr.

torchao's optional-kernel and pytree messages (filtered in streaming_llm/known_noise.py) and Ray's token-authentication
notice (filtered in gridrun/schedule.py) printed on every run before anything else.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_quantized_eval_prints_its_result_and_nothing_else():
    # Weight and KV quantization: torchao is imported by transformers and by streaming_llm/quant.py, and used.
    command = [sys.executable, "-m", "streaming_llm", "eval", "--model", "tiny-llama", "--max-tokens", "60",
               "--method", "streaming", "--sink", "2", "--window", "24", "--compress-every", "8",
               "--kv-quant", "int4", "--kv-quant-group", "8", "--weight-quant", "int8", "--device", "cpu"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"eval printed more than its result:\n{done.stderr}"
    summary = json.loads(done.stdout)
    assert (summary["config"]["kv_quant"], summary["config"]["weight_quant"]) == ("int4", "int8")
    assert summary["predicted_tokens"] == 59 and math.isfinite(summary["ppl"])


def test_a_grid_run_prints_its_progress_and_no_ray_notice(tmp_path):
    grid = tmp_path / "quiet.yaml"
    grid.write_text(textwrap.dedent("""\
        name: quiet
        base: {model: tiny-llama, dataset: shakespeare, cap: 48, sink: 4, warmup: 2, max_tokens: 40}
        experiments:
          one:
            runs:
              - {method: streaming, compress_every: 4}
    """))
    # A home of its own: Ray's first start on a machine (no ~/.ray/auth_token yet) is what a new user sees.
    done = subprocess.run(
        [sys.executable, "-m", "gridrun", str(grid), "--store", str(tmp_path / "store.duckdb"), "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1/1 done" in done.stdout
    assert done.stderr == "", f"gridrun printed more than its progress:\n{done.stderr}"
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()  # token authentication is still on


def test_only_the_known_harmless_messages_are_dropped(caplog):
    import logging

    import streaming_llm  # noqa: F401  (installs the filters)

    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING):
        torchao.warning("Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not "
                        "load this library")
        pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                       "type.", "<enum 'KernelPreference'>")
        torchao.warning("Failed to quantize layer 3: shape mismatch")
        pytree.warning("register_pytree_node is deprecated")
    assert [record.getMessage() for record in caplog.records] == [
        "Failed to quantize layer 3: shape mismatch", "register_pytree_node is deprecated"]
