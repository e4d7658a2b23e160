"""Outputs of a sweep: the findings JSON-lines file and the in-memory collector the CLI prints."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from relayaudit.errors import OutputError
from relayaudit.evidence import ProbeResult
from relayaudit.verdict import Finding, Verdict

__all__ = ["Collector", "FindingsFile"]


class FindingsFile:
    """Appends each finding as one JSON line, written with one O_APPEND write and fsynced.

    One write per line keeps lines whole when several sweep processes share the file; the
    fsync means a crash loses nothing that was reported written.
    """

    wants_unreachable = False  # closed ports have no findings

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.written = 0

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where the directory should be ("File exists" misleads)
            raise NotADirectoryError(
                errno.ENOTDIR, f"{self.path.parent} is not a directory"
            ) from None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def reopen(self) -> None:
        """For logrotate: the next line goes to a fresh file at the same path (if one is open)."""
        if self._fd is not None:
            self.close()
            self.open()

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        if not verdict.findings:
            return
        try:
            if self._fd is None:
                self.open()
            assert self._fd is not None
            for finding in verdict.findings:
                line = memoryview((finding.model_dump_json() + "\n").encode())
                while line:  # a short write happens only as the disk fills: finish, or fail below
                    line = line[os.write(self._fd, line) :]
                self.written += 1
            os.fsync(self._fd)
        except OSError as exc:  # a clear error (the daemon exits and resumes), not a traceback
            raise OutputError(
                f"output.findings: cannot write {str(self.path)!r}: {exc.strerror or exc}"
            ) from None


class Collector:
    """Keeps every verdict of a run in memory, for the summary and the demo's printout."""

    def __init__(self) -> None:
        self.results: list[tuple[ProbeResult, Verdict]] = []

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        self.results.append((result, verdict))

    @property
    def findings(self) -> list[Finding]:
        return [f for _, v in self.results for f in v.findings]
