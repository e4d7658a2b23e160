"""The findings file's record: one finding as one sweep saw it, its lifecycle status, a versioned schema.

One line of the findings file is one `FindingRecord`: a finding (every field of
`verdict.Finding`) plus who wrote it (`tool`, `tool_version`), under which schema
(`schema_version`), in which sweep and shard, and what the state store made of it (`status`,
`transition`). docs/findings.md is the field reference; schemas/ holds the JSON Schema,
generated from these models (`python -m relayaudit.export schemas/`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from functools import cache
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter

from relayaudit import __version__
from relayaudit.evidence import Exchange, TestResult
from relayaudit.verdict import Finding

__all__ = [
    "EVIDENCE_LINES",
    "RECORD_SCHEMA_VERSION",
    "FindingRecord",
    "FindingStatus",
    "Lifecycle",
    "Transition",
    "evidence_line",
    "record_lines",
    "schema_files",
    "to_record",
]

RECORD_SCHEMA_VERSION = 2  # 2 (issue 30): a relay's `remediation`, the weighed software guess
EVIDENCE_LINES = 5  # a compact record's evidence: the finding's first tests and the control


class Transition(StrEnum):
    """The changes of a finding that raise an alert; nothing else does."""

    NEW = "new"
    REOPENED = "reopened"
    SEVERITY_RAISED = "severity-raised"
    RESOLVED = "resolved"
    # an open finding's owner changed from one owner to another (issue 29): raised after the
    # sweep, by the state store's restamp, never on a findings file line
    OWNER_CHANGED = "owner-changed"


class FindingStatus(StrEnum):
    """A finding's place in its lifecycle, as the state store keeps it."""

    NEW = "new"  # first seen in the sweep that last saw it
    ONGOING = "ongoing"  # seen again in a later sweep
    RESOLVED = "resolved"  # absent from `resolve_after` consecutive sweeps of its address:port
    REOPENED = "reopened"  # seen again after it was resolved

    @property
    def open(self) -> bool:
        return self is not FindingStatus.RESOLVED


class Lifecycle:
    """What the state store made of one finding in one sweep (a line of the findings file)."""

    __slots__ = ("finding", "seq", "status", "transition")

    def __init__(
        self,
        finding: Finding,
        status: FindingStatus,
        transition: Transition | None,
        seq: int = 0,
    ) -> None:
        self.finding = finding
        self.status = status
        self.transition = transition
        self.seq = seq  # the finding's transition count in the store (the alert key's last part)


class FindingRecord(Finding):
    """One line of the findings file (and one finding of `report --format json`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    schema_version: Literal[2] = 2  # RECORD_SCHEMA_VERSION
    tool: Literal["relayaudit"] = "relayaudit"
    tool_version: str = __version__
    sweep_id: str
    shard: str  # "i/n"; "0/1" for an unsharded sweep
    # the state store's lifecycle status after this sweep; null where no store is kept
    # (`relayaudit sweep`, `demo`)
    status: FindingStatus | None = None
    # the change this sweep made, when it made one (the same as the alert it raised)
    transition: Transition | None = None
    # the first tests of `evidence`, one line each: what was sent and what the server said
    evidence_lines: tuple[str, ...] = ()
    # true: `evidence` and `transcript` are left out, `evidence_lines` stand for them (an
    # ongoing or resolved finding; `relayaudit show ID` and the state store keep the whole)
    compact: bool = False


def to_record(
    finding: Finding,
    *,
    sweep_id: str,
    shard: str,
    status: FindingStatus | None = None,
    transition: Transition | None = None,
    compact: bool = False,
) -> FindingRecord:
    fields: dict[str, Any] = dict(finding)
    if compact:
        fields["evidence"] = fields["transcript"] = ()
        # the guess's signs stay with the whole finding; `software` (and the remediation's
        # guess_confidence) say what it concluded
        fields["fingerprint"] = finding.fingerprint.model_copy(update={"software_guess": None})
    # no second validation: every field is the validated finding's, or of its declared type
    return FindingRecord.model_construct(
        **fields,
        evidence_lines=tuple(evidence_line(r) for r in finding.evidence[:EVIDENCE_LINES]),
        sweep_id=sweep_id,
        shard=shard,
        status=status,
        transition=transition,
        compact=compact,
    )


# where a record's transcript goes in its line; `"` inside any JSON string is escaped (`\"`),
# so this can only be the key itself (no nested model has a `transcript` field)
_NO_TRANSCRIPT = '"transcript":[]'


@cache
def _transcript_json() -> TypeAdapter[tuple[Exchange, ...]]:
    return TypeAdapter(tuple[Exchange, ...])


def record_lines(records: Sequence[FindingRecord]) -> list[str]:
    """The records' findings-file lines, each exactly its `model_dump_json()`.

    The findings of one probe share its transcript (about nine tenths of a line): it is
    serialized once and set into each line, not once per finding.
    """
    if len(records) < 2:
        return [record.model_dump_json() for record in records]
    lines = []
    shared: tuple[tuple[Exchange, ...], str] | None = None
    for record in records:
        transcript = record.transcript
        if not transcript:
            lines.append(record.model_dump_json())
            continue
        if shared is None or shared[0] is not transcript:
            text = _transcript_json().dump_json(transcript).decode()
            shared = (transcript, f'"transcript":{text}')
        bare = record.model_copy(update={"transcript": ()}).model_dump_json()
        lines.append(bare.replace(_NO_TRANSCRIPT, shared[1], 1))
    return lines


def evidence_line(result: TestResult) -> str:
    """`rcpt-plain (plain): <a@b> 250, <c@d> 250 2.1.5 Ok -> accepted`: the MAIL FROM path and
    its reply code, the RCPT TO path and its reply, the outcome; at most 200 characters."""
    text = f"{result.test.id} ({result.transport.value}): <{result.test.mail_from}>"
    if result.mail is not None:
        text += f" {result.mail.code}"
    if result.rcpt is not None:
        first = result.rcpt.text.splitlines()[0] if result.rcpt.text else ""
        text += f", <{result.test.rcpt_to}> {result.rcpt.code} {first[:60]}".rstrip()
    if result.error:
        text += f" ({result.error[:60]})"
    return f"{text} -> {result.outcome.value}"[:200]


def schema_files() -> dict[str, str]:
    """The committed JSON Schemas, by file name, as `schemas/` must hold them."""
    schema = FindingRecord.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    name = f"finding-record.v{RECORD_SCHEMA_VERSION}.schema.json"
    return {name: json.dumps(schema, indent=2, sort_keys=True) + "\n"}
