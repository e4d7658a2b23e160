"""The documentation stands alone: every relative link in README, CHANGELOG and docs/ resolves inside the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent

# `[text](target "title")`, `![alt](<target>)`; a target may hold one level of balanced parentheses
_INLINE = re.compile(
    r"\]\(\s*(?P<target><[^>\n]*>|(?:[^\s()]|\([^\s()]*\))+)"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
# `[label]: target` at the start of a line (at most three spaces in, as CommonMark allows)
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(?P<target><[^>\n]*>|\S+)")
# raw HTML in Markdown: `<img src="...">`, `<a href="...">`
_HTML = re.compile(r"<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*[\"'](?P<target>[^\"']*)[\"']")
_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Link:
    line: int
    target: str


def _blank_code_spans(line: str) -> str:
    """The line with each code span's text blanked, so `a[0](b)` in code is no link."""
    return _CODE_SPAN.sub(lambda m: m.group(1) + " " * len(m.group(2)) + m.group(1), line)


def links(text: str) -> Iterator[Link]:
    """Every link target in Markdown TEXT with its 1-based line number; fenced code is skipped."""
    fence: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        opener = _FENCE.match(raw)
        if fence is not None:
            if (
                opener is not None
                and opener.group(1)[0] == fence[0]
                and len(opener.group(1)) >= len(fence)
            ):
                fence = None
            continue
        if opener is not None:
            fence = opener.group(1)
            continue
        line = _blank_code_spans(raw)
        for pattern in (_INLINE, _REFERENCE, _HTML):
            for match in pattern.finditer(line):
                yield Link(number, match.group("target").removeprefix("<").removesuffix(">"))


def local_path(target: str) -> str | None:
    """The file part of a relative TARGET, or None for an absolute URL or a pure #anchor."""
    if not target or target.startswith("#") or _SCHEME.match(target) or target.startswith("//"):
        return None
    return unquote(target.split("#", 1)[0].split("?", 1)[0])


def resolve(document: Path, path: str, root: Path) -> Path:
    """Where PATH, linked from DOCUMENT, points; GitHub reads a leading / as the repository root."""
    base = root if path.startswith("/") else document.parent
    return (base / path.lstrip("/")).resolve()


def problem(resolved: Path, root: Path, ignored: frozenset[Path]) -> str | None:
    """Why RESOLVED is no file of the repository at ROOT; None if it is one."""
    if not resolved.is_relative_to(root):
        return "leaves the repository"
    if not resolved.exists():
        return "does not exist"
    if resolved in ignored:
        return "git ignores it: it is not in the repository"
    return None


def documents(root: Path) -> list[Path]:
    named = [root / "README.md", root / "CHANGELOG.md"]
    return [p for p in named if p.exists()] + sorted((root / "docs").glob("**/*.md"))


def git_ignored(root: Path, paths: list[Path]) -> frozenset[Path]:
    """Those of PATHS that git ignores in ROOT; none when ROOT is no git work tree (an sdist)."""
    if shutil.which("git") is None or not (root / ".git").exists() or not paths:
        return frozenset()
    answer = subprocess.run(
        ["git", "-C", str(root), "check-ignore", "--stdin", "-z"],
        input="\0".join(str(p) for p in paths),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return frozenset(Path(p) for p in answer.stdout.split("\0") if p)


def broken_links(root: Path) -> tuple[list[str], int]:
    """`file:line: target (why)` for every bad relative link under ROOT, and the links checked."""
    root = root.resolve()
    found: list[tuple[Path, Link, Path]] = []
    for document in documents(root):
        for link in links(document.read_text(encoding="utf-8")):
            path = local_path(link.target)
            if path is not None:
                found.append((document, link, resolve(document, path, root)))
    inside = [r for _, _, r in found if r.is_relative_to(root) and r.exists()]
    ignored = git_ignored(root, inside)
    bad = [
        f"{document.relative_to(root)}:{link.line}: {link.target} ({why})"
        for document, link, resolved in found
        if (why := problem(resolved, root, ignored)) is not None
    ]
    return bad, len(found)


def test_every_relative_link_in_the_docs_resolves_inside_the_repository() -> None:
    bad, checked = broken_links(ROOT)
    assert not bad, "relative links to nothing in the repository:\n" + "\n".join(bad)
    assert checked > 0, "no relative link found at all: is the link parser broken?"


def test_the_parser_finds_inline_image_reference_and_html_links_but_not_code() -> None:
    text = "\n".join(
        [
            'See [the map](docs/architecture.md#layers) and ![shot](<docs/report.png> "title").',
            "[ref]: ../shared/verdicts.md",
            "   [other]: <docs/a b.md>",
            '<img src="../shared/x.png" alt="">',
            "`[not](a-link.md)` [`code` text](docs/findings.md)",
            "[web](https://example.org/x) [mail](mailto:iso@example.org) [top](#top)",
            "[paren](docs/a_(b).md)",
            "```markdown",
            "[in a fence](nowhere.md)",
            "```",
            "after the fence [last](CHANGELOG.md)",
        ]
    )
    found = [(link.line, link.target) for link in links(text)]
    assert found == [
        (1, "docs/architecture.md#layers"),
        (1, "docs/report.png"),
        (2, "../shared/verdicts.md"),
        (3, "docs/a b.md"),
        (4, "../shared/x.png"),
        (5, "docs/findings.md"),
        (6, "https://example.org/x"),
        (6, "mailto:iso@example.org"),
        (6, "#top"),
        (7, "docs/a_(b).md"),
        (11, "CHANGELOG.md"),
    ]
    assert [local_path(t) for _, t in found[5:9]] == ["docs/findings.md", None, None, None]
    assert local_path("docs/a%20b.md#x") == "docs/a b.md"


def test_a_link_out_of_the_repository_or_to_nothing_is_named_with_file_and_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "[back](../README.md) [up](../../outside.md) [gone](missing.md#x) [root](/docs/guide.md)\n",
        encoding="utf-8",
    )
    (tmp_path / "README.md").write_text(
        "# x\n\nThe [ladder](../shared/verdicts.md) and [guide](docs/guide.md).\n", encoding="utf-8"
    )
    (tmp_path.parent / "outside.md").touch()
    bad, checked = broken_links(tmp_path)
    assert checked == 6
    assert bad == [
        "README.md:3: ../shared/verdicts.md (leaves the repository)",
        "docs/guide.md:1: ../../outside.md (leaves the repository)",
        "docs/guide.md:1: missing.md#x (does not exist)",
    ]


def test_a_link_to_a_file_git_ignores_is_named(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git not found")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=30)
    (tmp_path / ".gitignore").write_text("build/\n", encoding="utf-8")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "notes.md").touch()
    (tmp_path / "README.md").write_text("[notes](build/notes.md)\n", encoding="utf-8")
    bad, _ = broken_links(tmp_path)
    assert bad == ["README.md:1: build/notes.md (git ignores it: it is not in the repository)"]
