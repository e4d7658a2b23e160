"""One version, written once: pyproject.toml, the changelog, image tags, metadata, `--version`, records."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from importlib import metadata, resources
from pathlib import Path

import pytest
from cli_runner import run_main

import relayaudit
from relayaudit.alert_doc import AlertV1
from relayaudit.cli import EXAMPLE_CONFIG, version_text
from relayaudit.export import Report
from relayaudit.records import FindingRecord

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
BUMP = (
    "a release changes these together: pyproject.toml's version, a `## [X.Y.Z] - YYYY-MM-DD` "
    "section of CHANGELOG.md (what was under [Unreleased]), the README's `relayaudit:X.Y.Z` and "
    "the image tags under deploy/kubernetes/; then scripts/lock (uv.lock records the version) "
    "and python -m relayaudit.export schemas/ (the schemas' tool_version default)"
)

# Keep a Changelog 1.1.0: the kinds of change, and a release's heading
KINDS = ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")
_RELEASE = re.compile(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$")
_SEMVER = re.compile(r"\d+\.\d+\.\d+")


def test_the_version_is_written_in_pyproject_only() -> None:
    assert _SEMVER.fullmatch(VERSION), VERSION
    assert "dynamic" not in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # the installed metadata (an editable install reinstalls when pyproject.toml changes)
    assert metadata.version("relayaudit") == relayaudit.__version__ == VERSION
    written = [
        f"{p.relative_to(REPO)}:{n}"
        for p in sorted((REPO / "relayaudit").rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"""(?<!\w)(__version__|VERSION)\s*=\s*["']\d+\.\d+""", line)
    ]
    assert not written, f"a version typed in the code: {written}"


def _changelog() -> list[str]:
    return (REPO / "CHANGELOG.md").read_text(encoding="utf-8").splitlines()


def test_the_changelog_keeps_a_changelog() -> None:
    """[Unreleased] first, then releases newest first with ISO dates, each kind of change a
    Keep a Changelog heading."""
    lines = _changelog()
    assert lines[0] == "# Changelog"
    sections = [line for line in lines if line.startswith("## ")]
    assert sections[0] == "## [Unreleased]", sections[0]
    releases = []
    for heading in sections[1:]:
        match = _RELEASE.match(heading)
        assert match, f"CHANGELOG.md: {heading!r} is not `## [X.Y.Z] - YYYY-MM-DD`"
        releases.append((tuple(int(x) for x in match.group(1).split(".")), match.group(2)))
    assert releases, "CHANGELOG.md has no release section"
    assert releases == sorted(releases, reverse=True), "releases must run newest first"
    kinds = [line.removeprefix("### ") for line in lines if line.startswith("### ")]
    assert set(kinds) <= set(KINDS), sorted(set(kinds) - set(KINDS))


def test_the_latest_release_is_the_version() -> None:
    latest = next(m.group(1) for line in _changelog() if (m := _RELEASE.match(line)))
    assert latest == VERSION, f"CHANGELOG.md's latest release {latest}, pyproject {VERSION}: {BUMP}"


def test_the_image_tags_are_the_version() -> None:
    readme_text = (REPO / "README.md").read_text(encoding="utf-8")
    readme = re.findall(r"(?<![\w/.-])relayaudit:([\w.+-]+)", readme_text)  # not /etc/relayaudit:ro
    assert readme, "the README names no relayaudit:TAG image"
    manifests = {
        str(p.relative_to(REPO)): tag
        for p in sorted((REPO / "deploy").rglob("*.yaml"))
        for tag in re.findall(r"^\s*image:\s*\S+/relayaudit:(\S+)\s*$", p.read_text(), re.M)
    }
    assert len(manifests) >= 2, manifests  # the StatefulSet and the one-shot Job
    wrong = {k: v for k, v in manifests.items() if v != VERSION}
    assert set(readme) == {VERSION} and not wrong, (
        f"README: {sorted(set(readme))}, manifests: {wrong}; pyproject: {VERSION}: {BUMP}"
    )


def test_findings_reports_and_alerts_carry_the_version() -> None:
    for model in (FindingRecord, Report, AlertV1):
        assert model.model_fields["tool_version"].default == VERSION, model.__name__


def test_version_names_the_commit_of_a_checkout() -> None:
    """From a git checkout (CI's clone): `relayaudit X.Y.Z (git <12 hex>[, modified])`; the
    installed wheel prints the version alone (tests/test_container_steps.py)."""
    line = version_text()
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        assert line == f"relayaudit {VERSION}"
        pytest.skip("not a git checkout: the commit part cannot be tested here")
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(rf"relayaudit {re.escape(VERSION)} \(git {head}(, modified)?\)", line)


def test_the_version_option_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "--version") == (0, version_text() + "\n", "")


def test_config_example_prints_the_one_example_config(capsys: pytest.CaptureFixture[str]) -> None:
    """One file: config/relayaudit.example.toml is a link to the package data the command
    prints, so the two cannot differ."""
    packaged = resources.files("relayaudit").joinpath(EXAMPLE_CONFIG)
    link = REPO / "config" / "relayaudit.example.toml"
    assert link.is_symlink(), "config/relayaudit.example.toml must link to the package's copy"
    assert link.resolve() == (REPO / "relayaudit" / EXAMPLE_CONFIG).resolve()
    code, out, err = run_main(capsys, "config", "example")
    assert (code, err) == (0, "")
    assert out == packaged.read_text(encoding="utf-8") == link.read_text(encoding="utf-8")
    assert out.startswith("# Example relayaudit configuration")
