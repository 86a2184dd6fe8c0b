"""What produced a result: package versions, device, git commit, and the version of the evaluation code itself.

`code_version()` hashes the source of this package, so results made by other evaluation code can be told apart.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGES = ("torch", "transformers", "numpy", "tokenizers", "pyarrow", "torchao")


@functools.cache
def code_version() -> str:
    """sha256 (16 hex digits) of every .py file of streaming_llm, in name order."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def git_commit() -> str:
    """The repository's HEAD, with '-dirty' when the working tree differs; 'unknown' outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def fingerprint(device: torch.device) -> dict[str, str]:
    """Everything about the environment that can change a number, as strings."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {
        "python": platform.python_version(),
        **versions,
        "device": device_name(device),
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "none",
        "host": platform.node(),
        "git_commit": git_commit(),
        "code_version": code_version(),
    }
