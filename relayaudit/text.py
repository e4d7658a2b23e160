"""Text for people: clipped or wrapped at word boundaries, and times that name their zone."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

__all__ = ["ELLIPSIS", "clip", "span", "utc_time", "wrap"]

ELLIPSIS = "…"
_MIN_WRAP = 20  # columns of text a wrapped line keeps after its indent, however narrow the width
_TRAILING = " ,;:"  # left out before the ellipsis: "relay on…", not "relay on,…"


def clip(text: str, width: int | None) -> str:
    """`text` as one line of at most `width` characters (None: no limit).

    Whitespace runs and line breaks become one space. Text that does not fit ends after its last
    whole word that does, followed by "…". Only a first word longer than the whole width is cut
    inside, as there is no whole word to keep.
    """
    line = " ".join(text.split())
    if width is None or len(line) <= width:
        return line
    if width < 1:
        return ""
    room = width - len(ELLIPSIS)
    cut = line.rfind(" ", 0, room + 1)  # a space at index <= room: line[:cut] leaves room for "…"
    kept = line[:cut].rstrip(_TRAILING) if cut > 0 else ""
    return (kept or line[:room]) + ELLIPSIS


def wrap(text: str, width: int | None, *, indent: str = "") -> list[str]:
    """`text` as lines of at most `width` characters, each starting with `indent`.

    Lines break only between words; a word longer than a line stands whole on its own line. With
    no width, one line.
    """
    if width is None:
        return [indent + " ".join(text.split())]
    lines = textwrap.wrap(
        text,
        max(width, len(indent) + _MIN_WRAP),
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return lines or [indent]


def utc_time(when: datetime) -> str:
    """`2026-12-06 23:41:07 UTC`: every time in a table, in one zone that says which it is."""
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def span(seconds: float) -> str:
    """A duration for people: `4.2 s`, `38 s`, `12 min`, `5.5 h`, `3.0 days`."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
