"""Checks a log line of the ECS form against relayaudit/ecs_fields.json (ECS's own field list).

`problems(line)` names every field ECS does not define (outside `labels` and `relayaudit.*`),
every value of the wrong type, every categorization value ECS does not allow, and a missing or
malformed `@timestamp`, `ecs.version`, `message` or `log.level`.
"""

from __future__ import annotations

import ipaddress
import json
from datetime import datetime
from importlib import resources
from typing import Any

__all__ = ["ECS", "flatten", "problems"]

ECS: dict[str, Any] = json.loads(
    resources.files("relayaudit").joinpath("ecs_fields.json").read_text(encoding="utf-8")
)
_FIELDS: dict[str, str] = ECS["fields"]
_ARRAYS = frozenset(ECS["arrays"])
FREE = ("relayaudit",)  # relayaudit's own fields: any name, any JSON value
REQUIRED = ("@timestamp", "ecs.version", "message", "log.level")


def _iso8601(value: object) -> bool:
    if not isinstance(value, str) or "T" not in value:
        return False
    try:
        stamp = datetime.fromisoformat(value)  # 3.11: accepts Z and any fraction
    except ValueError:
        return False
    return stamp.tzinfo is not None


def _is_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return isinstance(value, str)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# what a JSON value of each ECS type may be
_CHECKS = {
    "keyword": lambda v: isinstance(v, str),
    "constant_keyword": lambda v: isinstance(v, str),
    "wildcard": lambda v: isinstance(v, str),
    "text": lambda v: isinstance(v, str),
    "match_only_text": lambda v: isinstance(v, str),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _number,
    "scaled_float": _number,
    "boolean": lambda v: isinstance(v, bool),
    "ip": _is_ip,
    "date": _iso8601,
}


def flatten(line: dict[str, Any]) -> dict[str, Any]:
    """Dotted paths to leaf values; `labels` and `relayaudit` stay whole (checked apart)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix not in ("labels", *FREE):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
            return
        if prefix in out:
            raise ValueError(f"{prefix}: written twice (dotted and nested)")
        out[prefix] = value

    walk("", line)
    return out


def problems(line: dict[str, Any]) -> list[str]:
    try:
        flat = flatten(line)
    except ValueError as exc:
        return [str(exc)]
    found = [f"{name}: missing" for name in REQUIRED if name not in flat]
    for name, value in flat.items():
        if name in FREE:
            if not isinstance(value, dict):
                found.append(f"{name}: not an object")
            continue
        kind = _FIELDS.get(name)
        if kind is None:
            found.append(f"{name}: not an ECS {ECS['ecs_version']} field")
            continue
        if name == "labels":
            if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                found.append(f"labels: not an object of strings: {value!r}")
            continue
        if name in _ARRAYS and not isinstance(value, list):
            found.append(f"{name}: ECS says an array, got {value!r}")
        check = _CHECKS.get(kind)
        if check is None:
            found.append(f"{name}: type {kind} is not one relayaudit writes")
            continue
        for item in value if isinstance(value, list) else [value]:
            if not check(item):
                found.append(f"{name}: {item!r} is not a {kind}")
        allowed = ECS["allowed_values"].get(name)
        if allowed is not None:
            found += [f"{name}: {v!r} is not allowed" for v in _items(value) if v not in allowed]
    if flat.get("ecs.version") != ECS["ecs_version"]:
        found.append(f"ecs.version: {flat.get('ecs.version')!r}, not {ECS['ecs_version']}")
    for category in _items(flat.get("event.category")):
        expected = ECS["expected_event_types"].get(category, [])
        for kind in _items(flat.get("event.type")):
            if kind not in expected:
                found.append(f"event.type {kind!r} is not one ECS expects for {category!r}")
    return found


def _items(value: object) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
