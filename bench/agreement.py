"""Reads both scanners' outputs (relayaudit findings JSONL and summary, nmap -oX XML) and compares
their verdicts with each other and with the campus ground truth, explaining each difference."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campus import Server

from relayaudit.lab import Behaviour

__all__ = [
    "NmapHost",
    "RaHost",
    "compare",
    "parse_nmap_xml",
    "parse_summary",
    "read_findings",
]

RELAY_KINDS = {
    "open-relay",
    "relay-campus-sender",
    "relay-after-starttls",
    "relay-claimed-helo",
    "relay-via-xclient",
}

# Why a side is expected to differ from the truth, per behaviour (shown next to each miss).
WHY: dict[tuple[str, str], str] = {
    ("nmap", Behaviour.CAMPUS_SENDER.value): (
        "nmap's 16 tests never use a campus-domain sender (its senders are <>, antispam@<test domain>,"
        " antispam@<server's banner name> and antispam@[IP]); only a server trusting its own host"
        " name would be caught"
    ),
    ("nmap", Behaviour.ACCEPT_ALL_DISCARD.value): (
        "nmap has no control recipient: a server that says 250 to everything looks like an open"
        " relay (relayaudit marks it low confidence: the impossible control recipient was accepted)"
    ),
    ("relayaudit", Behaviour.ACCEPT_ALL_DISCARD.value): (
        "relayaudit reports acceptance with confidence low (the control recipient was accepted too);"
        " only confirmation mode (canary) can tell it apart from a relay"
    ),
    ("nmap", Behaviour.TARPIT.value): (
        "tarpit: port open, no banner; nmap's script times out (no verdict)"
    ),
    ("relayaudit", Behaviour.TARPIT.value): (
        "tarpit: port open, no banner; relayaudit's status no-banner is not a finding, so it is"
        " counted from the summary, not the findings file"
    ),
}


@dataclass
class RaHost:
    """relayaudit's view of one address:port, from its findings."""

    smtp: bool = False  # an unapproved-smtp finding (or any finding): an SMTP service answered
    relay_kind: str | None = None
    confidence: str | None = None

    @property
    def relay(self) -> bool:
        return self.relay_kind is not None


@dataclass
class NmapHost:
    """nmap's view of one address:port, from -oX."""

    open: bool = False
    script: str | None = None  # smtp-open-relay output

    @property
    def relay(self) -> bool:
        return self.script is not None and self.script.startswith("Server is an open relay")


def read_findings(path: Path) -> dict[tuple[str, int], RaHost]:
    hosts: dict[tuple[str, int], RaHost] = defaultdict(RaHost)
    if not path.exists():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        f = json.loads(line)
        host = hosts[(str(f["address"]), int(f["port"]))]
        host.smtp = True
        if f["kind"] in RELAY_KINDS:
            host.relay_kind = str(f["kind"])
            host.confidence = str(f["confidence"])
    return dict(hosts)


_SWEEP_RE = re.compile(r"sweep: (\d+) hosts, (\d+) address:port probes in ([0-9.]+)s")
_ROW_RE = re.compile(r"^  ([a-z][a-z-]*)\s+(\d+)$")


def parse_summary(stdout: str) -> dict[str, Any]:
    """relayaudit sweep's summary: hosts, probes, its own elapsed time, statuses and finding kinds."""
    out: dict[str, Any] = {"statuses": {}, "findings": {}}
    match = _SWEEP_RE.search(stdout)
    if match:
        out["hosts"] = int(match.group(1))
        out["probes"] = int(match.group(2))
        out["elapsed_s"] = float(match.group(3))
    section = None
    for line in stdout.splitlines():
        stripped = line.strip()
        if stripped.startswith("status") and stripped.endswith("count"):
            section = "statuses"
            continue
        if stripped.startswith("finding kind"):
            section = "findings"
            continue
        row = _ROW_RE.match(line)
        if row and section:
            out[section][row.group(1)] = int(row.group(2))
        elif stripped:
            section = None
    return out


def parse_nmap_xml(path: Path) -> tuple[dict[tuple[str, int], NmapHost], dict[str, Any]]:
    """Per address:port state and smtp-open-relay output, and the run's own stats."""
    hosts: dict[tuple[str, int], NmapHost] = {}
    stats: dict[str, Any] = {}
    if not path.exists() or path.stat().st_size == 0:
        return hosts, stats
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        stats["parse_error"] = str(exc)
        return hosts, stats
    for host in root.iter("host"):
        addr_el = host.find("address")
        if addr_el is None:
            continue
        addr = addr_el.get("addr", "")
        for port_el in host.iter("port"):
            state = port_el.find("state")
            view = NmapHost(open=state is not None and state.get("state") == "open")
            script = port_el.find("script[@id='smtp-open-relay']")
            if script is not None:
                view.script = script.get("output", "").strip()
            hosts[(addr, int(port_el.get("portid", "0")))] = view
    finished = root.find("runstats/finished")
    if finished is not None:
        stats["elapsed_s"] = float(finished.get("elapsed", "0") or 0)
    hosts_el = root.find("runstats/hosts")
    if hosts_el is not None:
        stats["hosts_up"] = int(hosts_el.get("up", "0"))
        stats["hosts_total"] = int(hosts_el.get("total", "0"))
    stats["version"] = root.get("version")
    return hosts, stats


def _truth_relay(b: Behaviour) -> bool:
    return b in (Behaviour.OPEN_RELAY, Behaviour.CAMPUS_SENDER, Behaviour.RELAY_AFTER_STARTTLS)


def _nmap_label(view: NmapHost | None, relay: NmapHost | None) -> str:
    if view is None or not view.open:
        return "not open"
    if relay is None or relay.script is None:
        return "open, no script result"
    if relay.relay:
        return "open relay"
    text = relay.script.lower()
    if "authentication" in text:
        return "auth needed"
    if "all tests failed" in text:
        return "not a relay"
    return "error: " + relay.script.splitlines()[0][:60]


def _ra_label(view: RaHost | None) -> str:
    if view is None:
        return "no finding"
    if view.relay:
        return f"{view.relay_kind}/{view.confidence}"
    return "smtp, no relay"


def compare(
    servers: list[Server],
    port: int,
    ra: dict[tuple[str, int], RaHost] | None,
    ra_summary: dict[str, Any] | None,
    nmap_discovery: dict[tuple[str, int], NmapHost] | None,
    nmap_relay: dict[tuple[str, int], NmapHost] | None,
    *,
    filtered_expected: int = 0,
) -> dict[str, Any]:
    """Per behaviour, what each scanner said; relays found by both / one side; open-port agreement."""
    by_behaviour: dict[str, dict[str, Counter[str]]] = defaultdict(
        lambda: {"relayaudit": Counter(), "nmap": Counter()}
    )
    misses: list[dict[str, str]] = []
    relays = {"truth": 0, "both": 0, "relayaudit_only": 0, "nmap_only": 0, "neither": 0}
    open_ports: dict[str, Any] = {
        "truth": len(servers),
        "relayaudit_smtp_findings": 0,
        "nmap_open": 0,
    }
    truth_keys = {(s.host, port) for s in servers}
    for s in servers:
        key = (s.host, port)
        b = s.behaviour.value
        ra_view = ra.get(key) if ra is not None else None
        nd = nmap_discovery.get(key) if nmap_discovery is not None else None
        nr = nmap_relay.get(key) if nmap_relay is not None else None
        ra_label = _ra_label(ra_view) if ra is not None else "not run"
        nm_label = _nmap_label(nd, nr) if nmap_discovery is not None else "not run"
        by_behaviour[b]["relayaudit"][ra_label] += 1
        by_behaviour[b]["nmap"][nm_label] += 1
        if ra_view is not None:
            open_ports["relayaudit_smtp_findings"] += 1
        if nd is not None and nd.open:
            open_ports["nmap_open"] += 1
        ra_relay = ra_view is not None and ra_view.relay
        nm_relay = nr is not None and nr.relay
        truth = _truth_relay(s.behaviour)
        relays["truth"] += truth
        if ra is None or nmap_relay is None:
            continue
        if ra_relay and nm_relay:
            relays["both"] += 1
        elif ra_relay:
            relays["relayaudit_only"] += 1
        elif nm_relay:
            relays["nmap_only"] += 1
        else:
            relays["neither"] += 1
        if ra_relay != nm_relay or ra_relay != truth:
            misses.append(
                {
                    "address": s.host,
                    "behaviour": b,
                    "truth_relay": str(truth),
                    "relayaudit": ra_label,
                    "nmap": nm_label,
                }
            )
    extra_ra = sorted(k[0] for k in (ra or {}) if k not in truth_keys)
    extra_nmap = sorted(
        k[0] for k, v in (nmap_discovery or {}).items() if v.open and k not in truth_keys
    )
    statuses = (ra_summary or {}).get("statuses", {})
    tarpits = sum(1 for s in servers if s.behaviour is Behaviour.TARPIT)
    open_ports["relayaudit_no_banner"] = statuses.get("no-banner", 0)
    open_ports["truth_tarpits"] = tarpits
    open_ports["relayaudit_filtered"] = statuses.get("filtered", 0)
    open_ports["truth_filtered"] = filtered_expected
    open_ports["relayaudit_open_total"] = (
        open_ports["relayaudit_smtp_findings"] + open_ports["relayaudit_no_banner"]
    )
    open_ports["same_open_ports"] = (
        None
        if nmap_discovery is None
        else open_ports["relayaudit_open_total"] == open_ports["nmap_open"]
        and not extra_ra
        and not extra_nmap
    )
    # group the differences by behaviour, with the reason each side differs
    reasons: dict[str, dict[str, Any]] = {}
    for b, views in sorted(by_behaviour.items()):
        reasons[b] = {
            "relayaudit": dict(views["relayaudit"]),
            "nmap": dict(views["nmap"]),
            "why_relayaudit": WHY.get(("relayaudit", b)),
            "why_nmap": WHY.get(("nmap", b)),
        }
    return {
        "open_ports": open_ports,
        "unexpected_open": {"relayaudit": extra_ra[:20], "nmap": extra_nmap[:20]},
        "relays": relays,
        "by_behaviour": reasons,
        "differences": misses[:50],
        "differences_total": len(misses),
    }
