"""The ECS form of the log (`logging.format = "ecs"`): a structlog processor mapping relayaudit's
events to the fields of one Elastic Common Schema release.

relayaudit/ecs_fields.json lists that release's fields and types (written by
scripts/ecs_fields.py from the npm package @elastic/ecs); tests/test_ecs.py checks every line
against it. docs/logging.md is the mapping, event by event.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from relayaudit import __version__
from relayaudit.evidence import endpoint
from relayaudit.verdict import FindingKind

__all__ = ["DATASET", "ECS_VERSION", "EVENTS", "EcsFormatter", "EventClass"]

ECS_VERSION = "8.11.0"  # what @elastic/ecs 8.11.5 carries: relayaudit/ecs_fields.json
DATASET = "relayaudit.log"  # the ecs-logging default: ${service.name}.log
PRODUCT = "relayaudit"

# Bound context that describes the run, not the event: ECS `labels` (keyword values only).
LABELS = ("shard", "sweep_id")


@dataclass(frozen=True)
class EventClass:
    """An event's ECS categorization: values from ECS's allowed lists (ecs_fields.json)."""

    kind: str = "event"
    category: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    outcome: str | None = None  # ECS: none for `info` events and where it makes no sense


_EVENT_ORDER = ("kind", "category", "type", "action", "outcome", "dataset", "duration")
_NETWORK_INFO = EventClass(category=("network",), type=("info",))

# Every event relayaudit logs (tests/test_ecs.py finds the names in the source and checks each
# is here). An event missing here is still valid ECS: kind "event", no category.
EVENTS: Mapping[str, EventClass] = {
    "probe": EventClass(category=("network",), type=("connection",)),  # outcome: the port
    "probe.internal_error": EventClass(category=("network",), type=("info",), outcome="failure"),
    "finding.transition": EventClass(kind="alert", category=("vulnerability",), type=("info",)),
    "sweep.scheduled": _NETWORK_INFO,
    "sweep.start": EventClass(category=("network",), type=("start",)),
    "sweep.summary": EventClass(category=("network",), type=("end",), outcome="success"),
    "sweep.interrupted": EventClass(category=("network",), type=("end",)),  # resumes later
    "sweep.checkpoint_failed": EventClass(
        category=("database",), type=("error",), outcome="failure"
    ),
    "state.pruned": EventClass(category=("database",), type=("change",), outcome="success"),
    "daemon.start": EventClass(category=("process",), type=("start",), outcome="success"),
    "daemon.stop": EventClass(category=("process",), type=("end",), outcome="success"),
    "daemon.signal": EventClass(category=("process",), type=("info",)),
    "config.reloaded": EventClass(category=("configuration",), type=("change",), outcome="success"),
    "config.reload_rejected": EventClass(
        category=("configuration",), type=("change",), outcome="failure"
    ),
    "config.warning": EventClass(category=("configuration",), type=("info",)),
    # target sources (issue 26) and the owner table (issue 29), read before each sweep
    "sweep.skipped": EventClass(category=("network",), type=("end",), outcome="failure"),
    "sweep.no_source": EventClass(category=("configuration",), type=("info",)),
    "targets.source_failed": EventClass(category=("file",), type=("access",), outcome="failure"),
    "targets.skipped": EventClass(category=("configuration",), type=("info",)),
    "owners.failed": EventClass(category=("file",), type=("access",), outcome="failure"),
    "owners.warning": EventClass(category=("configuration",), type=("info",)),
    "owners.restamped": EventClass(category=("database",), type=("change",), outcome="success"),
    # alert hooks are API calls of ticket systems (or a command, or mail): ECS's `api`
    "alert.delivered": EventClass(category=("api",), type=("change",), outcome="success"),
    "alert.retry": EventClass(category=("api",), type=("change",), outcome="failure"),
    "alert.dead": EventClass(category=("api",), type=("change",), outcome="failure"),
    # an owner-changed alert a hook is not sent: its v1 or full document cannot say it
    "alert.skipped": EventClass(category=("api",), type=("change",)),
    "alert.ticket": EventClass(category=("api",), type=("creation",), outcome="success"),
    "alert.ticket_ref_missing": EventClass(
        category=("api",), type=("creation",), outcome="unknown"
    ),
    "alert.channels_renamed": EventClass(
        category=("database",), type=("change",), outcome="success"
    ),
    "alert.store_error": EventClass(category=("database",), type=("error",), outcome="failure"),
    "log_reopen_failed": EventClass(category=("file",), type=("access",), outcome="failure"),
}

_RELAY_RFC = "https://www.rfc-editor.org/rfc/rfc2505#section-2.1"  # restrict relaying (BCP 30)
# vulnerability.description and .reference of each kind of finding
FINDINGS: Mapping[FindingKind, tuple[str, str | None]] = {
    FindingKind.OPEN_RELAY: (
        "The SMTP server relays mail from outside senders to outside recipients (an open "
        "relay): anyone can send mail through it in the campus's name.",
        _RELAY_RFC,
    ),
    FindingKind.RELAY_CAMPUS_SENDER: (
        "The SMTP server relays to outside recipients when the sender claims a campus domain "
        "or the server's own name; anyone can write that, so it is an open relay in effect.",
        _RELAY_RFC,
    ),
    FindingKind.RELAY_AFTER_STARTTLS: (
        "The SMTP server refuses to relay in plain text but relays to outside recipients "
        "after STARTTLS.",
        _RELAY_RFC,
    ),
    FindingKind.RELAY_CLAIMED_HELO: (
        "The SMTP server refuses to relay for the scanner's own HELO name but relays to outside "
        "recipients for a client that claims a campus host name (or the server's own) in "
        "EHLO; anyone can type that, so it is an open relay in effect.",
        _RELAY_RFC,
    ),
    FindingKind.RELAY_VIA_XCLIENT: (
        "The SMTP server honours XCLIENT from the scanner and relays to outside recipients once "
        "the session claims a trusted client address: anyone there can relay.",
        _RELAY_RFC,
    ),
    FindingKind.ACCEPTS_WITHOUT_DELIVERY: (
        "The SMTP server accepted outside recipients, but the canary message never arrived: "
        "a trap or a server that accepts and discards.",
        _RELAY_RFC,
    ),
    FindingKind.REFUSES_AT_DATA: (
        "The SMTP server accepted outside recipients at RCPT but refused the canary message "
        "at DATA: it decides after the message and did not relay it.",
        _RELAY_RFC,
    ),
    FindingKind.UNAPPROVED_SMTP: (
        "An SMTP service that is not on the ISO's list of approved services.",
        None,
    ),
    FindingKind.AUTH_WITHOUT_TLS: (
        "The SMTP server offers AUTH on a connection without TLS: passwords can cross the "
        "network in clear text.",
        "https://www.rfc-editor.org/rfc/rfc4954#section-4",
    ),
    FindingKind.XCLIENT_OFFERED: (
        "The SMTP server offers XCLIENT to the scanner: a client it authorises can claim any "
        "client address, name and HELO, and is judged and logged as that client.",
        None,
    ),
}


def _is_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


def _put(doc: dict[str, Any], path: str, value: object) -> None:
    """doc["a"]["b"] = value for path "a.b", creating the objects on the way."""
    *parents, last = path.split(".")
    for name in parents:
        doc = doc.setdefault(name, {})
    doc[last] = value


class EcsFormatter:
    """structlog processor: a relayaudit event (after timestamp, level and redaction) -> ECS.

    `@timestamp`, `log.level`, `message` and `ecs.version` come first, as top-level dotted keys
    (the ecs-logging convention); the rest are nested objects. What ECS has no field for goes,
    under its own key, to `relayaudit.<group>`, the group being the event name's first part
    (`probe`, `sweep`, `finding`, `alert`, ...): one group's keys never clash with another's type.
    """

    def __init__(self, *, hostname: str) -> None:
        self.observer = {
            "vendor": PRODUCT,
            "product": PRODUCT,
            "version": __version__,
            "type": "scanner",
            "hostname": hostname,
        }

    def __call__(
        self, _logger: object, _method: str, event_dict: MutableMapping[str, Any]
    ) -> dict[str, Any]:
        rest = dict(event_dict)
        name = str(rest.pop("event", ""))
        doc: dict[str, Any] = {
            "@timestamp": rest.pop("timestamp", None),
            "log.level": rest.pop("level", None),
            "message": name,
            "ecs.version": ECS_VERSION,
        }
        logger = rest.pop("logger", None)
        if logger is not None:  # a stdlib record (asyncio, aiosmtpd): its text, no action
            _put(doc, "log.logger", str(logger))
            event: dict[str, Any] = {"kind": "event"}
            group = "library"
        else:
            spec = EVENTS.get(name, EventClass())
            event = {"kind": spec.kind}
            if spec.category:
                event["category"] = list(spec.category)
                event["type"] = list(spec.type)
            event["action"] = name
            if spec.outcome is not None:
                event["outcome"] = spec.outcome
            group = name.split(".", 1)[0]
        event["dataset"] = DATASET
        doc["event"] = event
        mapper = _MAPPERS.get(name)
        if mapper is not None:
            doc["message"] = mapper(rest, doc)
        if isinstance(rest.get("error"), str):
            _put(doc, "error.message", rest.pop("error"))
            if logger is None and name not in _MAPPERS:
                doc["message"] = f"{name}: {doc['error']['message']}"
        if "exception" in rest:  # format_exc_info's traceback
            _put(doc, "error.stack_trace", str(rest.pop("exception")))
        labels = {k: str(rest.pop(k)) for k in LABELS if rest.get(k) is not None}
        if labels:
            doc["labels"] = labels
        doc["observer"] = dict(self.observer)
        doc["service"] = {"name": PRODUCT}
        doc["event"] = {k: event[k] for k in _EVENT_ORDER if k in event}
        rest = {k: v for k, v in rest.items() if v is not None}
        if rest:
            doc["relayaudit"] = {group: rest}
        return doc


def _destination(rest: dict[str, Any], doc: dict[str, Any]) -> str:
    """address and port -> destination.ip/port (and `ADDRESS:PORT` for the message)."""
    address, port = rest.pop("address", None), rest.pop("port", None)
    if _is_ip(address):
        _put(doc, "destination.ip", str(address))
    elif address is not None:
        _put(doc, "destination.address", str(address))
    if isinstance(port, int) and not isinstance(port, bool):
        _put(doc, "destination.port", port)
    _put(doc, "network.transport", "tcp")
    return endpoint(str(address), port) if isinstance(port, int) else str(address)


def _probe(rest: dict[str, Any], doc: dict[str, Any]) -> str:
    where = _destination(rest, doc)
    doc["event"]["outcome"] = "success" if rest.get("port_state") == "open" else "failure"
    duration = rest.pop("duration_ms", None)
    if isinstance(duration, int | float):
        _put(doc, "event.duration", round(duration * 1_000_000))  # ECS: nanoseconds
    if _is_ip(rest.get("vantage")):
        _put(doc, "source.ip", str(rest.pop("vantage")))
    status = rest.get("status", "?")
    findings = rest.get("findings") or []
    found = f" ({', '.join(map(str, findings))})" if findings else ""
    return f"probe {where}: {status}{found}"


def _internal_error(rest: dict[str, Any], doc: dict[str, Any]) -> str:
    where = _destination(rest, doc)
    return f"probe {where}: internal error"


def _finding(rest: dict[str, Any], doc: dict[str, Any]) -> str:
    where = _destination(rest, doc)
    kind, severity = rest.get("kind"), rest.pop("severity", None)
    vulnerability: dict[str, Any] = {
        "id": rest.pop("finding_id", None),
        "enumeration": PRODUCT,  # the id is relayaudit's finding id (`relayaudit show ID`)
        "category": ["SMTP"],
        "severity": severity,
        "scanner": {"vendor": PRODUCT},
    }
    try:
        description, reference = FINDINGS[FindingKind(str(kind))]
    except ValueError:
        description, reference = None, None
    vulnerability["description"] = description
    vulnerability["reference"] = reference
    doc["vulnerability"] = {k: v for k, v in vulnerability.items() if v is not None}
    return f"finding {rest.get('transition', '?')}: {kind} at {where} ({severity})"


def _summary(rest: dict[str, Any], doc: dict[str, Any]) -> str:
    seconds = rest.pop("duration_s", None)
    if isinstance(seconds, int | float):
        _put(doc, "event.duration", round(seconds * 1_000_000_000))
    return (
        f"sweep done: {rest.get('probes', '?')} probes of {rest.get('hosts', '?')} hosts, "
        f"{rest.get('relays', '?')} relays"
    )


def _delivered(rest: dict[str, Any], _doc: dict[str, Any]) -> str:
    return f"alert {rest.get('transition', '?')} delivered to {rest.get('channel', '?')}"


_MAPPERS = {
    "probe": _probe,
    "probe.internal_error": _internal_error,
    "finding.transition": _finding,
    "sweep.summary": _summary,
    "alert.delivered": _delivered,
}
