"""uv.lock and the requirements files exported from it stay in step with pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import lockfile
import pytest
from packaging.requirements import Requirement

REPO = lockfile.REPO
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
FIX = "run scripts/lock, then commit pyproject.toml, uv.lock and requirements/"


def _uv_path() -> str:
    """PATH with the uv scripts/test installs (.venv/bin) first; a missing uv fails the tests."""
    path = f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("uv", path=path) is None:
        pytest.fail("uv not found: scripts/test installs the locked uv into .venv")
    return path


def _lock_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(root / "scripts" / "lock"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PATH": _uv_path()},
    )


def test_the_lock_and_its_exports_match_pyproject() -> None:
    done = _lock_check(REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def _copy_of_the_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(REPO / name, root / name)
    shutil.copy2(REPO / "scripts" / "lock", root / "scripts" / "lock")
    shutil.copytree(REPO / "requirements", root / "requirements")
    assert _lock_check(root).returncode == 0, "the copy must start in step"
    return root


def test_a_dependency_added_to_pyproject_fails_the_check_and_names_the_fix(tmp_path: Path) -> None:
    root = _copy_of_the_project(tmp_path)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    assert "dependencies = [\n" in text
    pyproject.write_text(
        text.replace("dependencies = [\n", 'dependencies = [\n    "idna>=3",\n', 1)
    )
    done = _lock_check(root)
    assert done.returncode == 1
    assert f"uv.lock out of step with pyproject.toml: {FIX}" in done.stderr


def test_an_edited_export_fails_the_check_and_names_the_file(tmp_path: Path) -> None:
    root = _copy_of_the_project(tmp_path)
    runtime = root / "requirements" / "runtime.txt"
    text = runtime.read_text(encoding="utf-8")
    runtime.write_text(text.replace("--hash=sha256:", "--hash=sha256:0", 1), encoding="utf-8")
    done = _lock_check(root)
    assert done.returncode == 1
    assert f"requirements/runtime.txt out of step with pyproject.toml: {FIX}" in done.stderr


def test_the_runtime_export_is_the_runtime_lock_with_hashes() -> None:
    """requirements/runtime.txt (what the image installs) holds exactly relayaudit[speed]'s
    locked dependencies, each pinned and hashed; the test extra and the groups stay out."""
    locked = lockfile.runtime()
    assert locked.pop("relayaudit") == PYPROJECT["project"]["version"]
    assert lockfile.exported(REPO / "requirements" / "runtime.txt") == locked
    assert "uvloop" in locked and not {"pytest", "setuptools", "pip", "uv"} & set(locked)


def test_the_build_backend_is_the_locked_one() -> None:
    """[build-system] and the `build` group ask for the same setuptools, and the locked one
    satisfies it: a build without isolation uses exactly what uv.lock names."""
    (backend,) = PYPROJECT["build-system"]["requires"]
    assert PYPROJECT["dependency-groups"]["build"] == [backend]
    requirement = Requirement(backend)
    assert requirement.name == "setuptools"
    upper = [s for s in requirement.specifier if s.operator in {"<", "<="}]
    assert upper, f"{backend}: the build backend needs an upper bound"
    locked = lockfile.load()["setuptools"]["version"]
    assert requirement.specifier.contains(locked), (backend, locked)
    exported = lockfile.exported(REPO / "requirements" / "build.txt")
    assert exported["setuptools"] == locked and "cyclonedx-bom" in exported
    assert PYPROJECT["tool"]["uv"]["no-build-isolation-package"] == ["relayaudit"]


def test_uv_is_bootstrapped_at_the_locked_version() -> None:
    locked = lockfile.load()["uv"]["version"]
    assert lockfile.exported(REPO / "requirements" / "uv.txt") == {"uv": locked}
    done = subprocess.run(
        ["uv", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "PATH": _uv_path()},
    )
    assert done.stdout.split()[:2] == ["uv", locked]


def test_the_license_is_an_spdx_expression() -> None:
    assert PYPROJECT["project"]["license"] == "MIT"
