"""Syslog priority prefixes on stdout when it is journald's stream (JOURNAL_STREAM), and only then.

journald reads `<N>` at the start of a line as its priority (sd-daemon(3)), so
`journalctl -p warning` shows warnings and findings and not the probes. A child process writes
the log, its stdout a pipe that JOURNAL_STREAM names (device:inode), as systemd sets it up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relayaudit.logs import journal_priority

ROOT = Path(__file__).resolve().parent.parent

# The child: the daemon's logging set-up (JSON lines to stdout and a file), the daemon's events.
CHILD = """
import sys
from pathlib import Path
import structlog
from relayaudit.config import LoggingConfig
from relayaudit.logs import configure_logging

configure_logging(LoggingConfig(file=Path(sys.argv[1]), format=sys.argv[2]), bind={"shard": "0/1"})
log = structlog.get_logger("relayaudit")
log.info("daemon.start", workers=4)
log.info("probe", address="192.0.2.7", port=25, port_state="open", status="open-relay")
log.info("finding.transition", transition="new", finding_id="ra-1", kind="open-relay",
         severity="critical", address="192.0.2.7", port=25, key="ra-1/new/1")
log.info("finding.transition", transition="resolved", finding_id="ra-2", kind="auth-without-tls",
         severity="medium", address="192.0.2.8", port=25, key="ra-2/resolved/1")
log.info("sweep.summary", hosts=2, probes=2, relays=1)
log.warning("alert.retry", key="ra-1/new/1", channel="jira", error="HTTP 503")
log.error("alert.dead", key="ra-1/new/1", channel="jira", error="HTTP 503")
"""
EVENTS = [
    ("daemon.start", "<5>"),
    ("probe", "<6>"),
    ("finding.transition", "<4>"),
    ("finding.transition", "<5>"),  # resolved
    ("sweep.summary", "<5>"),
    ("alert.retry", "<4>"),
    ("alert.dead", "<3>"),
]


def _run(tmp: Path, journal_stream: str | None, fmt: str = "json") -> tuple[list[str], list[str]]:
    """The child's stdout lines (a pipe) and its log file's lines; JOURNAL_STREAM as given,
    "PIPE" standing for the pipe's own device:inode."""
    read_end, write_end = os.pipe()
    stat = os.fstat(write_end)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(ROOT)
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream.replace("PIPE", f"{stat.st_dev}:{stat.st_ino}")
    log = tmp / "relayaudit.jsonl"
    log.unlink(missing_ok=True)
    with os.fdopen(read_end, "rb") as out:
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(log), fmt],
                stdout=write_end,
                stderr=subprocess.PIPE,
                env=env,
            )
        finally:
            os.close(write_end)
        stdout = out.read().decode()
        _, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr.decode()
    return stdout.splitlines(), log.read_text(encoding="utf-8").splitlines()


def test_journald_stdout_gets_priorities_and_the_file_plain_lines(tmp_path: Path) -> None:
    stdout, file = _run(tmp_path, "PIPE")
    assert [line[:3] for line in stdout] == [prefix for _, prefix in EVENTS]
    assert [line[3:] for line in stdout] == file  # the same line after its prefix
    assert [json.loads(line)["event"] for line in file] == [name for name, _ in EVENTS]
    # what `journalctl -p warning` shows: priority 4 or more urgent
    shown = [json.loads(line[3:]) for line in stdout if int(line[1]) <= 4]
    assert [e["event"] for e in shown] == ["finding.transition", "alert.retry", "alert.dead"]
    assert all(e["event"] != "probe" for e in shown)


def test_ecs_lines_get_the_same_priorities(tmp_path: Path) -> None:
    stdout, file = _run(tmp_path, "PIPE", fmt="ecs")
    assert [line[:3] for line in stdout] == [prefix for _, prefix in EVENTS]
    assert [json.loads(line)["event"]["action"] for line in file] == [n for n, _ in EVENTS]


@pytest.mark.parametrize(
    "journal_stream",
    [None, "", "0:0", "PIPE:1", "not-a-number", "1:2:3"],
    ids=["unset", "empty", "another-file", "malformed", "not-numbers", "three-parts"],
)
def test_plain_lines_when_stdout_is_not_journald(
    tmp_path: Path, journal_stream: str | None
) -> None:
    """An inherited JOURNAL_STREAM whose stdout was redirected since (systemd.exec(5): check it
    names stdout's device and inode) gets plain lines, as does no variable at all."""
    stdout, file = _run(tmp_path, journal_stream)
    assert stdout == file
    assert all(line.startswith("{") for line in stdout)


@pytest.mark.parametrize(
    ("event", "priority"),
    [
        ({"level": "debug", "event": "probe"}, 7),
        ({"level": "info", "event": "probe", "status": "open-relay"}, 6),
        ({"level": "info", "event": "finding.transition", "transition": "new"}, 4),
        ({"level": "info", "event": "finding.transition", "transition": "reopened"}, 4),
        ({"level": "info", "event": "finding.transition", "transition": "severity-raised"}, 4),
        ({"level": "info", "event": "finding.transition", "transition": "resolved"}, 5),
        ({"level": "info", "event": "sweep.summary"}, 5),
        ({"level": "info", "event": "daemon.stop"}, 5),
        ({"level": "warning", "event": "config.warning"}, 4),
        ({"level": "error", "event": "sweep.summary"}, 3),  # never less urgent than its level
        ({"level": "error", "event": "probe.internal_error"}, 3),
        ({"level": "critical", "event": "x"}, 2),
    ],
)
def test_priority_of_each_event(event: dict[str, Any], priority: int) -> None:
    assert journal_priority(event) == priority
