"""tomllines: the line of every key of a TOML document, checked against tomllib's own reading."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from toml_writer import toml_string, toml_value

from relayaudit.tomllines import KeyPath, key_lines, line_of

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

TRICKY = """\
# a comment with "quotes", [brackets] and key = value
title = "a # is not a comment here" # but here it is
'literal key' = 'c:\\path\\'
"quoted.key" = 1
dotted.inner = 2   # a dotted key
multi = \"\"\"
fake = "not a key"
[not.a.table]
\"\"\"
literal_multi = '''
x = 1 '''
after = 3
nums = [
  1,  # one
  [2, 3],
  { a = 4 },
]
date = 1979-05-27 07:32:00Z
quotes = \"\"\"ends with two quotes\"\"\"\"\"
esc = "tab\\there \\" [x] \\u00e9"

[table]
key = "v"

[[aot]]
name = "first"

[[aot.inner]]
x = 1

[[aot.inner]]
x = 2

[[aot]]
name = "second"

[[aot.inner]]
x = 3

[aot.sub]
y = 4

["weird key".b]
c = 5
"""

EXPECTED: dict[KeyPath, int] = {
    ("title",): 2,
    ("literal key",): 3,
    ("quoted.key",): 4,
    ("dotted", "inner"): 5,
    ("multi",): 6,
    ("literal_multi",): 10,
    ("after",): 12,
    ("nums",): 13,
    ("nums", 0): 14,
    ("nums", 1): 15,
    ("nums", 1, 0): 15,
    ("nums", 2, "a"): 16,
    ("date",): 18,
    ("quotes",): 19,
    ("esc",): 20,
    ("table",): 22,
    ("table", "key"): 23,
    ("aot",): 25,
    ("aot", 0): 25,
    ("aot", 0, "name"): 26,
    ("aot", 0, "inner", 0): 28,
    ("aot", 0, "inner", 1, "x"): 32,
    ("aot", 1): 34,
    ("aot", 1, "name"): 35,
    ("aot", 1, "inner", 0, "x"): 38,
    ("aot", 1, "sub", "y"): 41,
    ("weird key", "b", "c"): 44,
}


def test_tricky_document() -> None:
    data = tomllib.loads(TRICKY)
    assert data["multi"].startswith("fake")  # the fake key stays inside the string
    lines = key_lines(TRICKY)
    wrong = {k: (lines.get(k), v) for k, v in EXPECTED.items() if lines.get(k) != v}
    assert not wrong


def test_escaped_quotes_inside_multiline_strings() -> None:
    text = 'a = """x \\""" y"""\nb = \'\'\'\\\'\'\'\nc = 1\n'
    assert tomllib.loads(text) == {"a": 'x """ y', "b": "\\", "c": 1}
    assert key_lines(text) == {("a",): 1, ("b",): 2, ("c",): 3}


def test_crlf_line_ends() -> None:
    assert key_lines("a = 1\r\n\r\nb = [\r\n  2,\r\n]\r\n") == {
        ("a",): 1,
        ("b",): 3,
        ("b", 0): 4,
    }


def test_line_of_falls_back_to_the_longest_known_prefix() -> None:
    lines = key_lines("[limits]\nrate = 5\n")
    assert line_of(lines, ("limits", "rate")) == 2
    assert line_of(lines, ("limits", "concurrency")) == 1  # missing: its table's header
    assert line_of(lines, ("nowhere",)) is None


def test_text_tomllib_refuses_never_raises() -> None:
    assert key_lines('a = "unterminated\n') == {("a",): 1}
    assert key_lines("[[") == {}


def _leaves(data: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Every key path of a parsed document: keys, array elements, their insides."""
    found: list[KeyPath] = []
    if isinstance(data, dict):
        for k, v in data.items():
            found += [(*prefix, k), *_leaves(v, (*prefix, k))]
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += [(*prefix, i), *_leaves(v, (*prefix, i))]
    return found


def test_every_key_of_the_shipped_configs_has_its_line() -> None:
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        text = path.read_text(encoding="utf-8")
        lines = key_lines(text)
        rows = text.splitlines()
        for key in _leaves(tomllib.loads(text)):
            assert key in lines, f"{path.name}: {key}"
            last = key[-1]
            if isinstance(last, str):  # the key's name is written on its line
                row = rows[lines[key] - 1]
                assert last in row or f"[[{'.'.join(map(str, key[:-1]))}" in row, (key, row)


keys = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8)
scalars = st.one_of(st.integers(-5, 5), st.booleans(), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(
    doc=st.dictionaries(keys, values, min_size=1, max_size=6),
    gaps=st.lists(st.sampled_from(["", "# note = 1 [x]", "   "]), max_size=6),
    spread=st.booleans(),
)
def test_random_documents(doc: dict[str, Any], gaps: list[str], spread: bool) -> None:
    """Each top-level key on its own line (arrays spread one element a line, or not)."""
    out: list[str] = []
    expected: dict[KeyPath, int] = {}
    for n, (key, value) in enumerate(doc.items()):
        if n < len(gaps):
            out.append(gaps[n])
        name = toml_string(key)
        if spread and isinstance(value, list) and value:
            expected[(key,)] = len(out) + 1
            out.append(f"{name} = [")
            for i, item in enumerate(value):
                expected[(key, i)] = len(out) + 1
                out.append(f"  {toml_value(item)},")
            out.append("]")
        else:
            expected[(key,)] = len(out) + 1
            out.append(f"{name} = {toml_value(value)}")
    text = "\n".join(out) + "\n"
    assert tomllib.loads(text) == doc
    lines = key_lines(text)
    for path, line in expected.items():
        assert lines.get(path) == line, (path, text)
    for path in _leaves(doc):
        assert path in lines, (path, text)
