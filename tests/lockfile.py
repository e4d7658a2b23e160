"""uv.lock read for the tests: which packages, at which versions, an install of relayaudit gets."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from packaging.markers import Marker

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "uv.lock"
RUNTIME_EXTRAS = ("speed",)  # what the image installs: requirements/runtime.txt


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: `Jinja2`, `typing_extensions` ->
    `jinja2`, `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def load(path: Path = LOCK) -> dict[str, dict[str, Any]]:
    """uv.lock's packages by canonical name."""
    packages: dict[str, dict[str, Any]] = {}
    for package in tomllib.loads(path.read_text(encoding="utf-8"))["package"]:
        name = canonical(package["name"])
        # two versions of one name only come from a forked resolution, which this walk ignores
        assert name not in packages, f"uv.lock holds {name} twice: teach tests/lockfile.py forks"
        packages[name] = package
    return packages


def closure(
    packages: dict[str, dict[str, Any]], root: str, extras: Iterable[str] = ()
) -> dict[str, str]:
    """{name: version} of everything installing ROOT[EXTRAS] brings in on this interpreter and
    platform (markers evaluated here), ROOT itself included."""
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(canonical(root), tuple(extras))]
    done: set[tuple[str, str]] = set()
    while todo:
        name, wanted = todo.pop()
        package = packages[name]
        found[name] = package["version"]
        groups = [("", package.get("dependencies", []))]
        groups += [(e, package.get("optional-dependencies", {}).get(e, [])) for e in wanted]
        for label, deps in groups:
            if (name, label) in done:
                continue
            done.add((name, label))
            for dep in deps:
                marker = dep.get("marker")
                if marker is not None and not Marker(marker).evaluate():
                    continue
                todo.append((canonical(dep["name"]), tuple(dep.get("extra", ()))))
    return found


def runtime(path: Path = LOCK) -> dict[str, str]:
    """What the image's runtime venv must hold: relayaudit[speed] and its locked dependencies."""
    return closure(load(path), "relayaudit", RUNTIME_EXTRAS)


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)(?:\s*;\s*([^\\]+?))?\s*\\?$")


def exported(path: Path) -> dict[str, str]:
    """{name: version} of a requirements file `uv export` wrote, markers evaluated here; every
    requirement must carry at least one sha256 hash."""
    found: dict[str, str] = {}
    name = ""
    hashes: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := _PIN.match(line):
            name = canonical(match.group(1))
            hashes[name] = 0
            marker = match.group(3)
            if marker is None or Marker(marker).evaluate():
                found[name] = match.group(2)
        elif line.strip().startswith("--hash=sha256:"):
            hashes[name] += 1
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"{path.name}: a line the test cannot read: {line!r}")
    unhashed = sorted(n for n, count in hashes.items() if count == 0)
    assert not unhashed, f"{path.name}: no hash for {unhashed}"
    return found
