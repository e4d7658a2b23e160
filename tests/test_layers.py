"""The layer order of docs/architecture.md: no module imports one from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

import relayaudit

PACKAGE = Path(relayaudit.__file__).parent

# lowest first; a module may import its own layer and those below (docs/architecture.md)
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "foundations",
        frozenset(
            {
                "errors",
                "files",
                "sdnotify",
                "templating",
                "settings",
                "evidence",
                "framing",
                "wire",
                "pacer",
                "metrics",
                "eventloop",
                "targets",
                "scope",
                "tomllines",
                "text",
                "addresses",
            }
        ),
    ),
    (
        "rules",
        frozenset(
            {
                "config",
                "schedule",
                "failures",
                "battery",
                "verdict",
                "records",
                "connect",
                "facts",
                "greylisting",
                "sources",
                "software",
                "remediation",
                "owners",
            }
        ),
    ),
    ("session", frozenset({"observed", "session"})),
    ("session steps", frozenset({"silence", "handshake", "session_tests", "runner", "claims"})),
    ("confirmation", frozenset({"confirm"})),
    ("probe", frozenset({"probe"})),
    ("engine", frozenset({"engine", "progress"})),
    (
        "sinks",
        frozenset(
            {
                "sinks",
                "state",
                "alerts",
                "alert_doc",
                "logs",
                "ecs",
                "report",
                "canary",
                "canary_route",
            }
        ),
    ),
    ("exports", frozenset({"export", "html_page", "html_report", "live_report"})),
    ("commands", frozenset({"daemon", "demo", "cli", "deploy", "__main__", "__init__", "lab"})),
)
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """`relayaudit.lab.server` -> `lab`: a subpackage is one unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """relayaudit modules imported at run time (imports under `if TYPE_CHECKING:` excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("relayaudit."):
                found.add(_unit(node.module))
            elif node.module == "relayaudit":  # from relayaudit import lab
                found.update(a.name for a in node.names if a.name in RANK)
        elif isinstance(node, ast.Import):
            found.update(_unit(a.name) for a in node.names if a.name.startswith("relayaudit."))
    return found


def _modules() -> dict[str, Path]:
    return {
        _unit(".".join(("relayaudit", *p.relative_to(PACKAGE).with_suffix("").parts))): p
        for p in PACKAGE.rglob("*.py")
        if p.parent == PACKAGE  # subpackages are checked as one unit through their imports
    } | {"lab": PACKAGE / "lab"}


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(set(_modules()) - set(RANK))
    assert not unplaced, f"place these in LAYERS and docs/architecture.md: {unplaced}"


def test_no_module_imports_upward() -> None:
    upward = []
    for unit, path in _modules().items():
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            for dep in _imports(file) - {unit}:
                if RANK[dep] > RANK[unit]:
                    upward.append(
                        f"{file.relative_to(PACKAGE)} ({LAYERS[RANK[unit]][0]}) imports "
                        f"{dep} ({LAYERS[RANK[dep]][0]})"
                    )
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from relayaudit.engine import Sweep\nfrom relayaudit import lab\n")
    assert _imports(bad) == {"engine", "lab"}
    guarded = tmp_path / "guarded.py"
    guarded.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from relayaudit.cli import main\n"
    )
    assert _imports(guarded) == set()


def test_the_core_never_imports_the_lab() -> None:
    for unit, path in _modules().items():
        if unit in ("lab", "demo") or path.is_dir():
            continue
        assert "lab" not in _imports(path), unit
