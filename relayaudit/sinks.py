"""Outputs of a sweep: the findings JSON-lines file and the in-memory collector the CLI prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from relayaudit.evidence import ProbeResult
from relayaudit.verdict import Finding, Verdict

__all__ = ["Collector", "FindingsFile"]


class FindingsFile:
    """Appends each finding as one JSON line; flushed per line so a crash loses nothing written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self.written = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def reopen(self) -> None:
        """For logrotate: the next line goes to a fresh file at the same path."""
        self.close()
        self.open()

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        if self._file is None:
            self.open()
        assert self._file is not None
        for finding in verdict.findings:
            self._file.write(finding.model_dump_json() + "\n")
            self.written += 1
        if verdict.findings:
            self._file.flush()
            os.fsync(self._file.fileno())


class Collector:
    """Keeps every verdict of a run in memory, for the summary and the demo's printout."""

    def __init__(self) -> None:
        self.results: list[tuple[ProbeResult, Verdict]] = []

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        self.results.append((result, verdict))

    @property
    def findings(self) -> list[Finding]:
        return [f for _, v in self.results for f in v.findings]
