"""What a sweep has done: its counts (SweepStats) and the resume watermark."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from relayaudit.verdict import VerdictStatus

__all__ = ["SweepStats", "Watermark"]


@dataclass
class Watermark:
    """Tracks out-of-order completions; `low` = every position below it is done (resume point)."""

    low: int = 0
    _done: set[int] = field(default_factory=set)

    def done(self, position: int) -> None:
        self._done.add(position)
        while self.low in self._done:
            self._done.discard(self.low)
            self.low += 1


@dataclass
class SweepStats:
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished: datetime | None = None
    hosts: int = 0
    probes: int = 0
    statuses: Counter[VerdictStatus] = field(default_factory=Counter)
    findings: Counter[str] = field(default_factory=Counter)
    severities: Counter[str] = field(default_factory=Counter)  # findings per severity
    relay_findings: list[str] = field(default_factory=list)  # ids, for the summary to name them

    @property
    def relays(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.is_relay)

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started.isoformat(),
            "finished": (self.finished or self.started).isoformat(),
            "hosts": self.hosts,
            "probes": self.probes,
            "statuses": {k.value: v for k, v in self.statuses.items()},
            "findings": dict(self.findings),
            "severities": dict(self.severities),
            "relay_findings": list(self.relay_findings),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepStats:
        return cls(
            started=datetime.fromisoformat(data["started"]),
            finished=datetime.fromisoformat(data["finished"]),
            hosts=int(data["hosts"]),
            probes=int(data["probes"]),
            statuses=Counter({VerdictStatus(k): int(v) for k, v in data["statuses"].items()}),
            findings=Counter({str(k): int(v) for k, v in data["findings"].items()}),
            severities=Counter({str(k): int(v) for k, v in data["severities"].items()}),
            relay_findings=[str(i) for i in data["relay_findings"]],
        )

    @classmethod
    def merge(cls, parts: Sequence[SweepStats]) -> SweepStats:
        merged = cls(started=min(p.started for p in parts))
        merged.finished = max((p.finished or p.started) for p in parts)
        for p in parts:
            merged.hosts += p.hosts
            merged.probes += p.probes
            merged.statuses.update(p.statuses)
            merged.findings.update(p.findings)
            merged.severities.update(p.severities)
            merged.relay_findings.extend(p.relay_findings)
        return merged
