"""The ECS form of the log (`logging.format = "ecs"`): every line against ECS's own field list.

relayaudit/ecs_fields.json is ECS 8.11's flat field list (scripts/ecs_fields.py wrote it from
the npm package @elastic/ecs 8.11.5); tests/ecs_schema.py checks a line against it.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog
from daemon_harness import DaemonProcess, base_config, read_jsonl, write_config
from ecs_schema import ECS, flatten, problems

from relayaudit.config import LoggingConfig, parse_config
from relayaudit.demo import demo_lab, demo_settings
from relayaudit.ecs import ECS_VERSION, EVENTS, FINDINGS
from relayaudit.errors import ConfigError
from relayaudit.lab import Lab
from relayaudit.logs import REDACTED, LogHandle, configure_logging
from relayaudit.verdict import FindingKind

PACKAGE = Path(__file__).resolve().parent.parent / "relayaudit"

Configure = Callable[..., LogHandle]


@pytest.fixture
def configure() -> Iterator[Configure]:
    handles: list[LogHandle] = []

    def make(file: Path, *, fmt: Literal["json", "ecs"] = "ecs", **bind: object) -> LogHandle:
        config = LoggingConfig(file=file, stdout=False, level="debug", format=fmt)
        handle = configure_logging(config, bind=bind, environ={})
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.close()
    structlog.reset_defaults()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# One event of each kind the daemon writes, with the fields its call site passes.
SAMPLES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "info",
        "probe",
        {
            "address": "192.0.2.7",
            "port": 25,
            "port_state": "open",
            "status": "open-relay",
            "findings": ["open-relay", "unapproved-smtp"],
            "sessions": 2,
            "duration_ms": 812.4,
            "vantage": "192.0.2.1",
            "error": None,
        },
    ),
    (
        "info",
        "finding.transition",
        {
            "transition": "new",
            "finding_id": "ra-0123456789abcdef",
            "kind": "open-relay",
            "severity": "critical",
            "address": "2001:db8::7",
            "port": 587,
            "key": "ra-0123456789abcdef:new:1",
        },
    ),
    (
        "info",
        "sweep.summary",
        {
            "hosts": 3,
            "probes": 6,
            "relays": 1,
            "relay_findings": ["ra-0123456789abcdef"],
            "statuses": {"open-relay": 1, "closed": 5},
            "findings": {"open-relay": 1},
            "transitions": {"new": 1},
            "duration_s": 4.25,
        },
    ),
    ("info", "sweep.start", {"resumed": False, "start": 0, "total": 16}),
    ("info", "alert.delivered", {"key": "k:new", "channel": "jira", "transition": "new", "attempts": 1}),
    ("warning", "alert.retry", {"key": "k", "channel": "jira", "attempts": 1, "retry_in": 0.2, "error": "HTTP 503"}),
    ("warning", "config.warning", {"config": "/etc/relayaudit/relayaudit.toml", "warning": "readable"}),
    ("error", "sweep.checkpoint_failed", {"error": "database is locked"}),
    ("info", "daemon.start", {"config": "/etc/x.toml", "fingerprint": "abc", "workers": 8}),
    ("info", "not.in.the.table", {"anything": [1, {"x": None}]}),
]  # fmt: skip


def test_the_field_list_is_ecs_8_11_from_the_pinned_package() -> None:
    assert ECS["ecs_version"] == ECS_VERSION == "8.11.0"
    assert ECS["source"].startswith("@elastic/ecs@8.11.5 generated/ecs_flat.ts (sha512-")
    fields = ECS["fields"]
    assert len(fields) == 1659  # ECS 8.11's flat list, whole
    assert fields["@timestamp"] == "date" and fields["destination.ip"] == "ip"
    assert fields["labels"] == "object" and fields["event.duration"] == "long"
    assert "volume.size" not in fields  # ECS 8.12: the package's stale ecs_flat.js has it
    assert {"event.category", "event.type", "vulnerability.category"} <= set(ECS["arrays"])


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_each_event_class_uses_values_ecs_allows(name: str) -> None:
    spec = EVENTS[name]
    allowed = ECS["allowed_values"]
    assert spec.kind in allowed["event.kind"]
    assert set(spec.category) <= set(allowed["event.category"])
    for category in spec.category:
        assert set(spec.type) <= set(ECS["expected_event_types"][category]), category
    assert spec.outcome is None or spec.outcome in allowed["event.outcome"]
    assert bool(spec.category) == bool(spec.type)


def _logged_events() -> set[str]:
    """Event names of every `log.<level>("name", ...)` call in relayaudit's source."""
    levels = {"debug", "info", "warning", "error", "exception", "critical", "msg"}
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if "lab" in path.relative_to(PACKAGE).parts:  # the lab logs through stdlib logging
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr.removeprefix("a") in levels
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"log", "_log", "logger"}
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value)
    return names


def test_every_event_relayaudit_logs_has_its_ecs_categorization() -> None:
    logged = _logged_events()
    assert {"probe", "finding.transition", "sweep.summary", "alert.delivered"} <= logged
    assert logged - set(EVENTS) == set(), "add these to relayaudit/ecs.py's EVENTS"


def test_every_kind_of_finding_has_a_description() -> None:
    assert set(FINDINGS) == set(FindingKind)
    for description, reference in FINDINGS.values():
        assert description.endswith(".")
        assert reference is None or reference.startswith("https://www.rfc-editor.org/rfc/")


def test_every_event_is_valid_ecs(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "ecs.jsonl"
    handle = configure(path, shard="1/4")
    handle.bind(sweep_id="3f2a9c0d1e2b")
    log = structlog.get_logger("relayaudit")
    for level, name, fields in SAMPLES:
        getattr(log, level)(name, **fields)
    got = lines(path)
    assert len(got) == len(SAMPLES)
    for line in got:
        assert problems(line) == [], line
        assert list(line)[:4] == ["@timestamp", "log.level", "message", "ecs.version"]
        assert line["labels"] == {"shard": "1/4", "sweep_id": "3f2a9c0d1e2b"}
        assert line["observer"]["vendor"] == line["observer"]["product"] == "relayaudit"
        assert line["observer"]["hostname"]
        assert line["event"]["dataset"] == "relayaudit.log"
    actions = [line["event"].get("action") for line in got]
    assert actions == [name for _, name, _ in SAMPLES]


def test_probe_and_finding_fields(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "ecs.jsonl"
    configure(path)
    log = structlog.get_logger("relayaudit")
    for level, name, fields in SAMPLES[:3]:
        getattr(log, level)(name, **fields)
    probe, finding, summary = (flatten(line) for line in lines(path))
    assert probe["destination.ip"] == "192.0.2.7" and probe["destination.port"] == 25
    assert probe["source.ip"] == "192.0.2.1"
    assert probe["event.duration"] == 812_400_000  # nanoseconds
    assert (probe["event.kind"], probe["event.category"], probe["event.type"]) == (
        "event",
        ["network"],
        ["connection"],
    )
    assert probe["event.outcome"] == "success"  # the port answered
    assert probe["message"] == "probe 192.0.2.7:25: open-relay (open-relay, unapproved-smtp)"
    assert probe["relayaudit"] == {
        "probe": {
            "port_state": "open",
            "status": "open-relay",
            "findings": ["open-relay", "unapproved-smtp"],
            "sessions": 2,
        }
    }
    assert finding["event.kind"] == "alert" and finding["event.category"] == ["vulnerability"]
    assert finding["destination.ip"] == "2001:db8::7"
    assert finding["vulnerability.id"] == "ra-0123456789abcdef"
    assert finding["vulnerability.severity"] == "critical"
    assert finding["vulnerability.scanner.vendor"] == "relayaudit"
    assert finding["vulnerability.description"] == FINDINGS[FindingKind.OPEN_RELAY][0]
    assert finding["vulnerability.reference"].endswith("rfc2505#section-2.1")
    assert finding["message"] == "finding new: open-relay at [2001:db8::7]:587 (critical)"
    assert finding["relayaudit"]["finding"] == {
        "transition": "new",
        "kind": "open-relay",
        "key": "ra-0123456789abcdef:new:1",
    }
    assert summary["event.duration"] == 4_250_000_000
    assert summary["relayaudit"]["sweep"]["statuses"] == {"open-relay": 1, "closed": 5}


def test_event_is_an_object_in_ecs_and_the_name_in_json(
    configure: Configure, tmp_path: Path
) -> None:
    """The collision of issue 24: ECS's `event` is an object; relayaudit's own lines keep their
    `event` string, unchanged, by default."""
    json_path, ecs_path = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    configure(json_path, fmt="json")
    structlog.get_logger().info("probe", address="192.0.2.7", port=25)
    [plain] = lines(json_path)
    assert list(plain) == ["timestamp", "level", "event", "address", "port"]
    assert plain["event"] == "probe"
    configure(ecs_path)
    structlog.get_logger().info("probe", address="192.0.2.7", port=25)
    [ecs] = lines(ecs_path)
    assert isinstance(ecs["event"], dict) and ecs["event"]["action"] == "probe"
    assert "timestamp" not in ecs and "level" not in ecs and "address" not in ecs


def test_the_default_format_is_json() -> None:
    assert LoggingConfig().format == "json"


def test_an_unknown_format_is_a_config_error() -> None:
    base = {"scope": ["127.0.0.0/8"], "targets": ["127.0.0.1/32"]}
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "logging": {"format": "gelf"}}, source="(test)")
    assert "logging.format" in str(info.value)
    config = parse_config({**base, "logging": {"format": "ecs"}}, source="(test)")
    assert config.logging.format == "ecs"


def test_secrets_are_redacted_in_the_ecs_form(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "ecs.jsonl"
    handle = configure(path, api_token="bound-secret")
    handle.bind(hmac_key="k3y")
    structlog.get_logger().warning(
        "alert.retry",
        key="finding-42:new",
        channel="tickets",
        token="t0ken",
        headers={"Authorization": "Bearer abc.def", "Content-Type": "application/json"},
        hooks=[{"url": "https://ops:pa55@tickets.example/api", "auth_token": "zzz"}],
        error="server said: Authorization: Bearer abc.def rejected",
    )
    text = path.read_text(encoding="utf-8")
    for secret in ("bound-secret", "k3y", "t0ken", "abc.def", "pa55", "zzz"):
        assert secret not in text
    [line] = lines(path)
    assert problems(line) == []
    assert line["error"]["message"] == f"server said: Authorization: Bearer {REDACTED} rejected"
    alert = line["relayaudit"]["alert"]
    assert alert["token"] == alert["api_token"] == alert["hmac_key"] == REDACTED
    assert alert["headers"]["Authorization"] == REDACTED
    assert alert["hooks"] == [
        {"url": f"https://ops:{REDACTED}@tickets.example/api", "auth_token": REDACTED}
    ]
    assert alert["key"] == "finding-42:new"


def test_tracebacks_and_library_records(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "ecs.jsonl"
    configure(path)
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        structlog.get_logger().error(
            "probe.internal_error",
            address="192.0.2.7",
            port=25,
            error="internal error: RuntimeError: boom",
            exc_info=exc,
        )
    logging.getLogger("asyncio").warning("Task was destroyed but it is pending!")
    internal, library = lines(path)
    assert problems(internal) == [] and problems(library) == []
    assert internal["error"]["message"] == "internal error: RuntimeError: boom"
    assert "RuntimeError: boom" in internal["error"]["stack_trace"]
    assert internal["event"]["outcome"] == "failure"
    assert library["message"] == "Task was destroyed but it is pending!"
    assert library["log"] == {"logger": "asyncio"}
    assert "action" not in library["event"]


def test_the_checker_finds_what_is_wrong() -> None:
    good = {
        "@timestamp": "2025-01-02T03:04:05.678901Z",
        "log.level": "info",
        "message": "m",
        "ecs.version": ECS_VERSION,
        "event": {"kind": "event", "category": ["network"], "type": ["connection"]},
        "destination": {"ip": "192.0.2.7", "port": 25},
        "labels": {"shard": "0/1"},
        "relayaudit": {"probe": {"anything": [1, None]}},
    }
    assert problems(good) == []
    bad = {
        **good,
        "@timestamp": "yesterday",
        "event": {"kind": "finding", "category": ["vulnerability"], "type": ["start"]},
        "destination": {"ip": "mx.campus.test", "port": "25"},
        "labels": {"n": 1},
        "address": "192.0.2.7",
    }
    found = "\n".join(problems(bad))
    for expected in (
        "@timestamp: 'yesterday' is not a date",
        "event.kind: 'finding' is not allowed",
        "event.type 'start' is not one ECS expects for 'vulnerability'",
        "destination.ip: 'mx.campus.test' is not a ip",
        "destination.port: '25' is not a long",
        "labels: not an object of strings",
        "address: not an ECS 8.11.0 field",
    ):
        assert expected in found
    assert problems({**good, "log": {"level": "x"}}) == [
        "log.level: written twice (dotted and nested)"
    ]


# -- a real daemon sweeping a lab like the demo's, in ECS form, stdout to "journald" ----------

NET = "127.0.150.0/28"
PORT, TLS_PORT = 2750, 4750
CANARY = ("127.0.150.14", 2751)
CANARY_DOMAIN = "canary.iso.test"


def _lab() -> Lab:
    """The demo's lab (relayaudit/demo.py's DEMO_LAB) on addresses of its own."""
    return demo_lab(
        prefix="127.0.150", port=PORT, tls_port=TLS_PORT, canary=CANARY, canary_domain=CANARY_DOMAIN
    )


def _daemon_config(tmp: Path) -> Path:
    data = base_config(tmp, NET, PORT)
    (tickets,) = data["alerts"]["command"]
    data.update(
        {
            **demo_settings(
                prefix="127.0.150",
                port=PORT,
                tls_port=TLS_PORT,
                canary=CANARY,
                canary_domain=CANARY_DOMAIN,
            ),
            "schedule": {"interval": "1h"},
            "logging": {"file": str(tmp / "log.jsonl"), "stdout": True, "format": "ecs"},
            "alerts": {
                "backoff_initial": "0.1s",
                "backoff_max": "0.2s",
                "max_attempts": 2,
                "command": [
                    {"name": "tickets", "argv": tickets["argv"]},
                    {"name": "broken", "argv": [sys.executable, "-c", "import sys; sys.exit(3)"]},
                ],
            },
        }
    )
    return write_config(tmp / "relayaudit.toml", data)


def _actions(path: Path) -> list[str]:
    return [e["event"].get("action", "") for e in read_jsonl(path) if isinstance(e["event"], dict)]


@pytest.mark.time_limit(90)
async def test_a_demo_sweep_of_the_daemon_in_ecs_form(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Every line of a sweep of the demo's lab validates; stdout, journald's, carries priorities."""
    log = tmp_path / "log.jsonl"
    cfg = _daemon_config(tmp_path)
    read_end, write_end = os.pipe()
    stat = os.fstat(write_end)
    d = DaemonProcess(cfg, log, env={"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
    daemons.append(d)
    chunks: list[bytes] = []

    def drain() -> None:  # the daemon never blocks on a full pipe
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)  # until EOF: the daemon, the last writer, exited

    reader = threading.Thread(target=drain, daemon=True)
    try:
        async with _lab():
            await d.start(stdout=write_end)
            os.close(write_end)
            write_end = -1
            reader.start()
            await d.wait_for(lambda: "sweep.summary" in _actions(log), 60, "the sweep")
            await d.wait_for(
                lambda: {"alert.delivered", "alert.dead"} <= set(_actions(log)), 20, "alerts"
            )
            await d.signal(signal.SIGTERM)
            assert await d.exit_code(20) == 0
    finally:
        await d.kill()  # if still running
        if write_end >= 0:
            os.close(write_end)
        if reader.is_alive():
            await asyncio.to_thread(reader.join, 10)
        os.close(read_end)

    file_lines = log.read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in file_lines]
    for event in events:
        assert problems(event) == [], event
    actions = [e["event"].get("action") for e in events]
    for action in (
        "daemon.start",
        "sweep.start",
        "probe",
        "finding.transition",
        "sweep.summary",
        "alert.delivered",
        "alert.retry",
        "alert.dead",
        "daemon.signal",
        "daemon.stop",
    ):
        assert action in actions, action
    probes = [e for e in events if e["event"].get("action") == "probe"]
    probed = {(e["destination"]["ip"], e["destination"]["port"]) for e in probes}
    assert {(spec.host, spec.port) for spec in _lab().specs} <= probed
    assert (CANARY[0], PORT) not in probed
    statuses = {e["relayaudit"]["probe"]["status"] for e in probes}
    assert {"open-relay", "closed", "auth-required", "no-banner", "inconclusive"} <= statuses
    findings = [e for e in events if e["event"].get("action") == "finding.transition"]
    kinds = {e["relayaudit"]["finding"]["kind"] for e in findings}
    assert {"open-relay", "relay-campus-sender", "auth-without-tls", "unapproved-smtp"} <= kinds
    assert all(e["vulnerability"]["id"].startswith("ra-") for e in findings)

    # stdout is journald (JOURNAL_STREAM names the pipe): the same lines, each with its priority
    out = b"".join(chunks).decode("utf-8").splitlines()
    assert [line.split(">", 1)[1] for line in out] == file_lines  # the file: plain lines
    priority: dict[str, set[str]] = {}
    for line, event in zip(out, events, strict=True):
        prefix = line[: line.index(">") + 1]
        priority.setdefault(event["event"].get("action", ""), set()).add(prefix)
    assert priority["probe"] == {"<6>"}
    assert priority["finding.transition"] == {"<4>"}  # journalctl -p warning shows them
    assert priority["sweep.summary"] == priority["daemon.start"] == {"<5>"}
    assert priority["alert.retry"] == {"<4>"} and priority["alert.dead"] == {"<3>"}
