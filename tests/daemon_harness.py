"""Runs `relayaudit run` as a child process for tests: TOML config writer, JSON-log reader, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toml_writer import toml_document

from relayaudit.errors import StateError
from relayaudit.state import Alert, FindingRow, StateStore, Transition

__all__ = [
    "HOOK",
    "DaemonProcess",
    "StoreView",
    "base_config",
    "read_jsonl",
    "ticket_identities",
    "toml_document",
    "write_config",
]

ROOT = Path(__file__).resolve().parent.parent

# a command alert hook: appends the alert to a JSON-lines "ticket system" if it is whole JSON
# (a hook killed with the daemon may see a truncated stdin; a real ticketing CLI would refuse it)
HOOK = """\
import json, os, sys
data = sys.stdin.read()
json.loads(data)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, (data.replace("\\n", " ") + "\\n").encode())
os.close(fd)
"""


def base_config(tmp: Path, net: str, port: int, *, tickets: Path | None = None) -> dict[str, Any]:
    """A daemon config sweeping `net`:`port` on loopback, everything written under `tmp`."""
    hook = tmp / "hook.py"
    hook.write_text(HOOK, encoding="utf-8")
    return {
        "scope": ["127.0.0.0/8"],
        "targets": [net],
        "ports": [port],
        "identity": {"helo_name": "relayaudit.campus.test"},
        # a greylisting lab server is tried again at the sweep's end: soon, in tests
        "relay": {"campus_domains": ["campus.test"], "greylist_retry_after": "1s"},
        "timeouts": {"connect": "1s", "command": "2s", "session": "20s"},
        "limits": {"concurrency": 16, "rate": 1000, "subnet_rate": 1000},
        "schedule": {"interval": "1s"},
        "state": {"path": str(tmp / "state.sqlite"), "resolve_after": 1},
        "logging": {"file": str(tmp / "log.jsonl"), "stdout": False},
        "metrics": {"enabled": False},
        "output": {"findings": str(tmp / "findings.jsonl")},
        "alerts": {
            "backoff_initial": "0.1s",
            "backoff_max": "0.5s",
            "max_attempts": 1000,
            "command": [
                {
                    "argv": [sys.executable, str(hook), str(tickets or tmp / "tickets.jsonl")],
                    "timeout": "10s",
                }
            ],
        },
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(toml_document(data), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Whole JSON lines of a file (a line being written at the moment of reading is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def ticket_identities(tickets: list[dict[str, Any]]) -> dict[str, set[tuple[str, str]]]:
    """Idempotency key -> the (transition, finding id) pairs delivered under it (one, if sound)."""
    seen: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for t in tickets:
        seen[t["idempotency_key"]].add((t["transition"], t["finding_id"]))
    return dict(seen)


class StoreView:
    """What the state file holds, read-only: findings, alerts, outbox counts.

    A file not (yet) there, or still being created, reads as empty with `ok` False, so tests
    can poll it from the first moment of a daemon's life.
    """

    def __init__(self, path: Path) -> None:
        self.ok = False
        self.findings: list[FindingRow] = []
        self.alerts: list[Alert] = []
        self.outbox = {"pending": -1, "sent": 0, "dead": 0}
        store = StateStore(path)
        try:
            store.open(readonly=True)
            self.findings = store.findings()
            self.alerts = store.alerts()
            self.outbox = store.outbox_counts()
            self.ok = True
        except StateError:
            pass
        finally:
            store.close()

    def new_alert_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for a in self.alerts:
            if a.transition is Transition.NEW:
                counts[a.finding.id] += 1
        return dict(counts)


class DaemonProcess:
    """One `relayaudit run --config CFG` child; its JSON log is read from `log`."""

    def __init__(
        self,
        cfg: Path,
        log: Path,
        *,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.env = env
        self.prefix = prefix  # e.g. unshare(1) that execs the daemon in a namespace (same pid)
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""

    async def start(self, *, stdout: Path | int | None = None) -> None:
        """Start the child; its stdout is discarded, appended to `stdout` (a path), or written to
        it (a file descriptor, e.g. a pipe's: the caller keeps and closes it)."""
        out = stdout.open("ab") if isinstance(stdout, Path) else None
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.prefix,
                sys.executable,
                "-m",
                "relayaudit",
                "run",
                "--config",
                str(self.cfg),
                stdout=stdout if isinstance(stdout, int) else out or asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(self.env or {})},
            )
        finally:
            if out is not None:
                out.close()  # the child has its own copy

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_jsonl(self.log) if name is None or e.get("event") == name]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `predicate` every 0.1 s for at most `timeout` s; fail early if the daemon exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.returncode is not None:
                await self._collect_stderr()
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} waiting for {what}: {self.stderr.decode()}"
                )
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    async def _collect_stderr(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            with contextlib.suppress(TimeoutError):
                self.stderr += await asyncio.wait_for(self.proc.stderr.read(), 5)

    async def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def exit_code(self, timeout: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._collect_stderr()
        return code

    async def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; the daemon's exit code."""
        await self.signal(signal.SIGTERM)
        return await self.exit_code(timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._collect_stderr()
