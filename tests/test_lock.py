"""The locks (requirements/*.txt, made by scripts/lock) pin every dependency pyproject.toml names,
at a version its range admits, with hashes: what setup, CI and /opt install is what pyproject allows.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^ ;\\]+)", re.M)


def _pins(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / lock).read_text()
    return {canonicalize_name(n): v for n, v in _PIN.findall(text)}


def _requirements(extra: str | None) -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    if extra:
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    reqs += [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    return reqs


@pytest.mark.parametrize(("lock", "extra"), [("runtime.txt", None), ("test.txt", "test")])
def test_every_dependency_is_pinned_within_its_range(lock: str, extra: str | None) -> None:
    pins = _pins(lock)
    for req in _requirements(extra):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements/{lock}: run scripts/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {req.name}=={pins[name]} outside pyproject's {req.specifier}: run scripts/lock"
        )


@pytest.mark.parametrize("lock", ["runtime.txt", "test.txt"])
def test_every_pin_has_a_hash(lock: str) -> None:
    text = (ROOT / "requirements" / lock).read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.strip())
    for block in blocks:
        if block.startswith("#"):
            continue
        assert "--hash=sha256:" in block, f"no hash for {block.splitlines()[0]} in requirements/{lock}"
    assert len(blocks) == len(_pins(lock))  # nothing but pins with hashes


def test_the_test_lock_holds_the_runtime_lock() -> None:
    runtime, test = _pins("runtime.txt"), _pins("test.txt")
    assert {n: test.get(n) for n in runtime} == runtime, "the two locks disagree: run scripts/lock"
