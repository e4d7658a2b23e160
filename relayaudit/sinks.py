"""Outputs of a sweep: the findings JSON-lines file and the in-memory collector the CLI prints."""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from relayaudit.errors import OutputError
from relayaudit.evidence import ProbeResult
from relayaudit.files import open_append
from relayaudit.records import FindingRecord, Lifecycle, Transition, record_lines, to_record
from relayaudit.verdict import Finding, Verdict

__all__ = ["Collector", "FindingsFile", "new_sweep_id"]

Transcripts = Literal["changes", "always"]


def new_sweep_id() -> str:
    """A sweep's id where no state store gives one (`sweep`, `demo`): the store's format."""
    return uuid.uuid4().hex[:12]


SYNC_EVERY = 1.0  # seconds between a findings file's fsyncs while lines come


class FindingsFile:
    """Appends one FindingRecord per finding per sweep as a JSON line: one O_APPEND write each.

    One write per line keeps lines whole when several sweep processes share the file. The
    file is fsynced at most once a second while lines come, and when it is closed (the end of
    every sweep), so a crash of the machine loses at most the last second's lines, and never
    one that a sweep's summary counted (an fsync per host was a tenth of a relay test's CPU).
    Fed by the state store
    (`write`, the daemon) each line carries the finding's lifecycle status, and a line with no
    change (ongoing, resolved) is compact unless `transcripts = "always"`; as a plain sink
    (`emit`: `sweep`, `demo`) every line is whole and its status null. See docs/findings.md.
    """

    wants_unreachable = False  # closed ports have no findings

    def __init__(
        self,
        path: Path,
        *,
        sweep_id: str | None = None,
        shard: str = "0/1",
        transcripts: Transcripts = "changes",
    ) -> None:
        self.path = path
        self.sweep_id = sweep_id or new_sweep_id()
        self.shard = shard
        self.transcripts = transcripts
        self._fd: int | None = None
        self._synced = 0.0  # time.monotonic() of the last fsync
        self._dirty = False  # lines written since
        self.written = 0
        self.bytes = 0

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where the directory should be ("File exists" misleads)
            raise NotADirectoryError(
                errno.ENOTDIR, f"{self.path.parent} is not a directory"
            ) from None
        self._fd = open_append(self.path)

    def close(self) -> None:
        if self._fd is not None:
            try:
                if self._dirty:
                    self._sync()
            finally:
                os.close(self._fd)
                self._fd = None

    def _sync(self) -> None:
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise self._error(exc) from None
        self._dirty = False
        self._synced = time.monotonic()

    def reopen(self) -> None:
        """For logrotate: the next line goes to a fresh file at the same path (if one is open)."""
        if self._fd is not None:
            self.close()
            self.open()

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        """A sweep with no state store: each finding whole, with no lifecycle status."""
        if verdict.findings:
            self._append(
                to_record(f, sweep_id=self.sweep_id, shard=self.shard) for f in verdict.findings
            )

    def write(self, lines: Iterable[Lifecycle]) -> None:
        """What the state store made of one probe's findings (StateSink's `on_lines`)."""
        self._append(
            to_record(
                line.finding,
                sweep_id=self.sweep_id,
                shard=self.shard,
                status=line.status,
                transition=line.transition,
                compact=self.transcripts != "always"
                and line.transition in (None, Transition.RESOLVED),
            )
            for line in lines
        )

    def _append(self, records: Iterable[FindingRecord]) -> None:
        try:
            if self._fd is None:
                self.open()
            assert self._fd is not None
            # one probe's lines in one write (O_APPEND: together, after any other writer's)
            lines = record_lines(list(records))
            if lines:
                data = ("\n".join(lines) + "\n").encode()
                rest = memoryview(data)
                while rest:  # a short write happens only as the disk fills: finish, or fail below
                    rest = rest[os.write(self._fd, rest) :]
                self.written += len(lines)
                self.bytes += len(data)
                self._dirty = True
                if time.monotonic() - self._synced >= SYNC_EVERY:
                    self._sync()
        except OSError as exc:  # a clear error (the daemon exits and resumes), not a traceback
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(
            f"output.findings: cannot write {str(self.path)!r}: {exc.strerror or exc}"
        )


class Collector:
    """Keeps every verdict of a run in memory, for the summary and the demo's printout."""

    def __init__(self) -> None:
        self.results: list[tuple[ProbeResult, Verdict]] = []

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        self.results.append((result, verdict))

    @property
    def findings(self) -> list[Finding]:
        return [f for _, v in self.results for f in v.findings]
