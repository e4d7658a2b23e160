"""Where each key of a TOML document sits: key path -> line number (tomllib gives no positions)."""

from __future__ import annotations

import contextlib
import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence

__all__ = ["KeyPath", "key_lines", "line_of"]

#: A key path as tomllib's result is indexed: ("alerts", "webhook", 0, "url"), ("targets", 2).
KeyPath = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}\r\n#]*")  # number, boolean, date-time (which may hold a space)
_SPACE = " \t"
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def key_lines(text: str) -> dict[KeyPath, int]:
    """The 1-based line of every key, table header and array element of a TOML document.

    A key maps to the line where its value starts; an array element to the line where the
    element starts; a table (`[a.b]`, `[[a.b]]`) to its header's line, `[[a.b]]` with its
    index. Meant for text tomllib has already accepted: on anything else it returns what it
    found before the first surprise, and never raises.
    """
    scanner = _Scanner(text)
    with contextlib.suppress(IndexError, ValueError):
        scanner.document()
    return scanner.found


def line_of(lines: Mapping[KeyPath, int], path: Sequence[str | int]) -> int | None:
    """The line of `path`, else of its longest prefix that has one (a missing key: its table)."""
    for end in range(len(path), 0, -1):
        line = lines.get(tuple(path[:end]))
        if line is not None:
            return line
    return None


class _Scanner:
    """A reader of TOML's structure only: keys, headers, where values start and end."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.found: dict[KeyPath, int] = {}
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]
        # an array of tables, by its path (indexes of enclosing arrays of tables included),
        # to the number of its elements seen so far
        self._tables: dict[KeyPath, int] = {}

    def _line(self) -> int:
        return bisect_right(self._starts, self.i)

    def _skip(self, *, newlines: bool) -> None:
        """Past spaces and comments; past line ends too when `newlines`."""
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in _SPACE or (newlines and c in "\r\n"):
                self.i += 1
            elif c == "#":
                end = s.find("\n", self.i)
                self.i = len(s) if end < 0 else end
            else:
                return

    def document(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self.i >= len(self.s):
                return
            if self.s[self.i] == "[":
                table = self._header()
            else:
                keys = self._key()
                self._skip(newlines=False)
                self._expect("=")
                self._skip(newlines=False)
                self._value((*table, *keys))

    def _header(self) -> KeyPath:
        line = self._line()
        many = self.s.startswith("[[", self.i)
        self.i += 2 if many else 1
        self._skip(newlines=False)
        keys = self._key()
        self._skip(newlines=False)
        self._expect("]]" if many else "]")
        path: KeyPath = ()
        for n, key in enumerate(keys):
            path = (*path, key)
            last = n == len(keys) - 1
            if last and many:
                count = self._tables.get(path, 0)
                self._tables[path] = count + 1
                self.found.setdefault(path, line)
                path = (*path, count)
            elif path in self._tables:  # inside an array of tables: its latest element
                path = (*path, self._tables[path] - 1)
        self.found[path] = line
        return path

    def _expect(self, token: str) -> None:
        if not self.s.startswith(token, self.i):
            raise ValueError(f"expected {token!r} at {self.i}")
        self.i += len(token)

    def _key(self) -> tuple[str, ...]:
        """A dotted key: its parts, quotes removed and escapes decoded as tomllib does."""
        parts: list[str] = []
        while True:
            self._skip(newlines=False)
            c = self.s[self.i]
            if c == '"':
                parts.append(self._basic())
            elif c == "'":
                end = self.s.index("'", self.i + 1)
                parts.append(self.s[self.i + 1 : end])
                self.i = end + 1
            else:
                match = _BARE.match(self.s, self.i)
                if match is None:
                    raise ValueError(f"no key at {self.i}")
                parts.append(match.group())
                self.i = match.end()
            self._skip(newlines=False)
            if self.i < len(self.s) and self.s[self.i] == ".":
                self.i += 1
                continue
            return tuple(parts)

    def _basic(self) -> str:
        """A one-line basic string at the cursor, decoded."""
        s = self.s
        self.i += 1
        out: list[str] = []
        while s[self.i] != '"':
            c = s[self.i]
            if c == "\\":
                kind = s[self.i + 1]
                if kind in "uU":
                    width = 4 if kind == "u" else 8
                    out.append(chr(int(s[self.i + 2 : self.i + 2 + width], 16)))
                    self.i += 2 + width
                    continue
                out.append(_ESCAPES.get(kind, kind))
                self.i += 2
                continue
            out.append(c)
            self.i += 1
        self.i += 1
        return "".join(out)

    def _value(self, path: KeyPath) -> None:
        self.found[path] = self._line()
        s = self.s
        c = s[self.i]
        if c == "[":
            self.i += 1
            index = 0
            while True:
                self._skip(newlines=True)
                if s[self.i] == "]":
                    self.i += 1
                    return
                self._value((*path, index))
                index += 1
                self._skip(newlines=True)
                if s[self.i] == ",":
                    self.i += 1
        elif c == "{":
            self.i += 1
            while True:
                self._skip(newlines=False)
                if s[self.i] == "}":
                    self.i += 1
                    return
                keys = self._key()
                self._skip(newlines=False)
                self._expect("=")
                self._skip(newlines=False)
                self._value((*path, *keys))
                self._skip(newlines=False)
                if s[self.i] == ",":
                    self.i += 1
        elif s.startswith(('"""', "'''"), self.i):
            self._multiline(s[self.i])
        elif c == '"':
            self._basic()
        elif c == "'":
            self.i = s.index("'", self.i + 1) + 1
        else:
            match = _SCALAR.match(s, self.i)
            assert match is not None  # the pattern matches the empty string too
            self.i = match.end()

    def _multiline(self, quote: str) -> None:
        s = self.s
        self.i += 3
        while not s.startswith(quote * 3, self.i):
            self.i += 2 if quote == '"' and s[self.i] == "\\" else 1
            if self.i >= len(s):
                raise ValueError("unterminated string")
        self.i += 3
        # up to two quotes of the content may stand right before the closing delimiter
        for _ in range(2):
            if self.i < len(s) and s[self.i] == quote:
                self.i += 1
