"""Writes relayaudit/ecs_fields.json: the name and type of every field of one pinned ECS release.

    python scripts/ecs_fields.py                    # npm pack @elastic/ecs@8.11.5 into a temp dir
    python scripts/ecs_fields.py --tarball FILE.tgz # the same package, already downloaded

The source is the npm package @elastic/ecs (ECS's own TypeScript definitions), at the version
pinned below and checked against its published sha512 integrity. The list is read from
`generated/ecs_flat.ts`, the flat field definitions, and the ECS release from `EcsVersion` in
`generated/index.ts`. Not from `generated/ecs_flat.js`: the package ships a stale compiled copy
(identical in 8.11.5 and 9.4.0, with `volume.*` fields that ECS 8.11 does not define).

The tests check every line of the log's ECS form against the written file (tests/test_ecs.py);
relayaudit/ecs.py's ECS_VERSION must equal its `ecs_version`. The file keeps, per field, its
type only; besides, the fields ECS says must be arrays, and the allowed values of the four
categorization fields (`event.kind`, `event.category`, `event.type`, `event.outcome`) with the
event types each category expects.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, ClassVar

PACKAGE = "@elastic/ecs"
VERSION = "8.11.5"  # carries ECS 8.11.0, the last 8.x release, read by Elastic 8.x and 9.x alike
INTEGRITY = (  # `npm view @elastic/ecs@8.11.5 dist.integrity`
    "sha512-S7qkIaRrKHyiU6ww0r5qt8mOh8wK8w3LpNdMb0qxuj6wxQmn6TVpZ9DxxICGVKwaPbQIYuNTmBPSUocl+VhINw=="
)
FLAT = "package/generated/ecs_flat.ts"
INDEX = "package/generated/index.ts"
OUT = Path(__file__).resolve().parent.parent / "relayaudit" / "ecs_fields.json"
CATEGORIZATION = ("event.kind", "event.category", "event.type", "event.outcome")


class _Parser:
    """Reads the one JavaScript object literal a generated .ts file exports (no eval, no node)."""

    _IDENT = re.compile(r"[A-Za-z_$@][\w$@.]*")
    _NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
    _ESCAPES: ClassVar[dict[str, str]] = {
        "n": "\n",
        "t": "\t",
        "r": "\r",
        "b": "\b",
        "f": "\f",
        "v": "\v",
        "0": "\0",
    }

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> ValueError:
        line = self.text.count("\n", 0, self.pos) + 1
        return ValueError(f"line {line}: {what}")

    def skip(self) -> None:
        while True:
            while self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1
            if self.text.startswith("/*", self.pos):
                self.pos = self.text.index("*/", self.pos) + 2
            elif self.text.startswith("//", self.pos):
                self.pos = self.text.index("\n", self.pos)
            else:
                return

    def expect(self, token: str) -> None:
        self.skip()
        if not self.text.startswith(token, self.pos):
            raise self.fail(f"expected {token!r}")
        self.pos += len(token)

    def value(self) -> Any:
        self.skip()
        char = self.text[self.pos : self.pos + 1]
        if char == "{":
            return self.mapping()
        if char == "[":
            return self.array()
        if char in "'\"":
            return self.string()
        if match := self._NUMBER.match(self.text, self.pos):
            self.pos = match.end()
            return json.loads(match.group())
        if match := self._IDENT.match(self.text, self.pos):
            self.pos = match.end()
            words = {"true": True, "false": False, "null": None}
            if match.group() in words:
                return words[match.group()]
        raise self.fail("expected a value")

    def string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out = []
        while (char := self.text[self.pos]) != quote:
            if char == "\n":
                raise self.fail("newline in a string")
            self.pos += 1
            if char == "\\":
                char = self.text[self.pos]
                self.pos += 1
                if char == "u":
                    char, self.pos = chr(int(self.text[self.pos : self.pos + 4], 16)), self.pos + 4
                elif char == "x":
                    char, self.pos = chr(int(self.text[self.pos : self.pos + 2], 16)), self.pos + 2
                else:  # JavaScript: an unknown escape is the character itself ('\(' is '(')
                    char = self._ESCAPES.get(char, char)
            out.append(char)
        self.pos += 1
        return "".join(out)

    def key(self) -> str:
        self.skip()
        if self.text[self.pos] in "'\"":
            return self.string()
        match = self._IDENT.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a key")
        self.pos = match.end()
        return match.group()

    def items(self, close: str) -> bool:
        """After an item: True if another follows (a trailing comma is allowed)."""
        self.skip()
        if self.text.startswith(",", self.pos):
            self.pos += 1
            self.skip()
        return not self.text.startswith(close, self.pos)

    def mapping(self) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        while self.items("}"):
            name = self.key()
            self.expect(":")
            out[name] = self.value()
        self.expect("}")
        return out

    def array(self) -> list[Any]:
        self.expect("[")
        out: list[Any] = []
        while self.items("]"):
            out.append(self.value())
        self.expect("]")
        return out


def exported(text: str, name: str) -> Any:
    """The value of `export const NAME = <literal>` in a generated .ts file."""
    start = re.search(rf"^export const {re.escape(name)} =", text, re.M)
    if start is None:
        raise ValueError(f"no 'export const {name}'")
    parser = _Parser(text)
    parser.pos = start.end()
    return parser.value()


def compact(flat: dict[str, Any], ecs_version: str) -> dict[str, Any]:
    fields = {name: spec["type"] for name, spec in sorted(flat.items())}
    arrays = sorted(name for name, spec in flat.items() if "array" in spec.get("normalize", ()))
    allowed = {name: [v["name"] for v in flat[name]["allowed_values"]] for name in CATEGORIZATION}
    expected = {
        v["name"]: v.get("expected_event_types", [])
        for v in flat["event.category"]["allowed_values"]
    }
    return {
        "ecs_version": ecs_version,
        "source": f"{PACKAGE}@{VERSION} {FLAT.removeprefix('package/')} ({INTEGRITY})",
        "generated_by": "scripts/ecs_fields.py",
        "fields": fields,
        "arrays": arrays,
        "allowed_values": allowed,
        "expected_event_types": expected,
    }


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(directory: Path) -> Path:
    """`npm pack` the pinned version into `directory` (the registry client as configured here)."""
    subprocess.run(
        ["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent", "--pack-destination", str(directory)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )
    (tarball,) = directory.glob("*.tgz")
    return tarball


def generate(tarball: Path) -> dict[str, Any]:
    data = tarball.read_bytes()
    if integrity(data) != INTEGRITY:
        raise SystemExit(f"{tarball}: not {PACKAGE}@{VERSION} (integrity {integrity(data)})")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        texts = {}
        for member in (FLAT, INDEX):
            file = tar.extractfile(member)
            if file is None:
                raise SystemExit(f"{tarball}: no {member}")
            texts[member] = file.read().decode("utf-8")
    version = exported(texts[INDEX], "EcsVersion")
    flat = exported(texts[FLAT], "EcsFlat")
    return compact(flat, version)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, help=f"{PACKAGE}-{VERSION}.tgz, already packed")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch(Path(tmp))
        result = generate(tarball)
    text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: ECS {result['ecs_version']}, {len(result['fields'])} fields")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
