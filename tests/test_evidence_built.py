"""`evidence.built`, the hot path's constructor: the same object as pydantic's `model_construct`
for every model it builds, and every call site gives every field (nothing left to default)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from relayaudit.evidence import (
    Exchange,
    RelayTest,
    Reply,
    TestCategory,
    TestOutcome,
    TestResult,
    TestRole,
    Transport,
    built,
)

ROOT = Path(__file__).resolve().parent.parent / "relayaudit"
MODELS: dict[str, type[BaseModel]] = {
    "Exchange": Exchange,
    "RelayTest": RelayTest,
    "Reply": Reply,
    "TestResult": TestResult,
}


def test_built_equals_model_construct() -> None:
    reply = Reply.model_construct(code=250, text="2.1.0 Ok")
    test = RelayTest(
        id="rcpt-plain",
        category=TestCategory.RECIPIENT,
        role=TestRole.PLAIN,
        mail_from="a@sender.example",
        rcpt_to="b@relay-test.example",
    )
    cases: list[tuple[type[BaseModel], dict[str, Any]]] = [
        (Reply, {"code": 554, "text": "5.7.1 Relay access denied"}),
        (RelayTest, {**test.model_dump(), "category": test.category, "role": test.role}),
        (
            Exchange,
            {"command": "MAIL FROM:<a@b>", "reply": reply, "error": None, "elapsed_ms": 1.5},
        ),
        (Exchange, {"command": None, "reply": None, "error": "timeout", "elapsed_ms": 0.0}),
        (
            TestResult,
            {
                "test": test,
                "transport": Transport.PLAIN,
                "mail": reply,
                "rcpt": reply,
                "outcome": TestOutcome.ACCEPTED,
                "error": None,
            },
        ),
    ]
    for cls, values in cases:
        fast, slow = built(cls, dict(values)), cls.model_construct(**values)
        assert fast == slow and type(fast) is cls
        assert fast.model_dump_json() == slow.model_dump_json()
        assert fast.model_fields_set == slow.model_fields_set == set(cls.model_fields)
        assert hash(fast) == hash(slow)  # frozen models: usable as keys alike


def test_every_call_site_gives_every_field() -> None:
    """`built` fills no default: a field a call site forgets would be missing from the object."""
    sites = 0
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "built"):
                continue
            if path.name == "evidence.py":
                continue
            model, values = node.args
            assert isinstance(model, ast.Name) and isinstance(values, ast.Dict), path
            keys = {k.value for k in values.keys if isinstance(k, ast.Constant)}
            assert keys == set(MODELS[model.id].model_fields), (path, node.lineno, keys)
            sites += 1
    assert sites >= 5
