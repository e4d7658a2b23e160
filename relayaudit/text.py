"""Text for people: server text made visible, clipped or wrapped at word boundaries, and times
that name their zone."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

__all__ = ["ELLIPSIS", "clip", "span", "utc_time", "visible", "wrap"]

ELLIPSIS = "…"
_MIN_WRAP = 20  # columns of text a wrapped line keeps after its indent, however narrow the width
_TRAILING = " ,;:"  # left out before the ellipsis: "relay on…", not "relay on,…"

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def visible(text: str) -> str:
    """`text` with every character that could forge, hide or reorder output shown as an escape.

    Those are the characters Python's `repr` escapes (`str.isprintable`): C0 and C1 controls and
    DEL (a newline, a carriage return, ESC), format characters (the bidi marks, embeddings,
    overrides and isolates U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069; zero-width
    characters), line and paragraph separators, spaces other than " ", lone surrogates (which
    cannot even be encoded for the terminal), private and unassigned code points. Newline,
    carriage return and tab become `\\n`, `\\r`, `\\t`; others `\\xNN` (ESC is `\\x1b`, as
    evidence.writable_text writes it), `\\uNNNN` (`\\u202e`) or `\\UNNNNNNNN`. Every other
    character, backslashes included, is kept. The result is one line that shows what the server
    sent and can neither start another line, move the cursor nor turn text around. For people
    only: evidence and JSON keep the text itself.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


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
