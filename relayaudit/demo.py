"""`relayaudit demo`: starts a loopback lab of SMTP servers, sweeps it with confirmation on, stops it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from relayaudit.alerts import Dispatcher, channel_names, check_templates
from relayaudit.canary import CanaryReceiver
from relayaudit.config import AlertsConfig, Config, config_fingerprint, parse_config
from relayaudit.engine import Sink, SweepStats, sweep
from relayaudit.errors import TemporaryError, UsageError
from relayaudit.evidence import endpoint
from relayaudit.export import format_of, from_sweep, render
from relayaudit.files import write_text
from relayaudit.html_page import SMTP_STATUSES, Service, page_from_sweep
from relayaudit.html_report import render_html
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.lab.ticket_apis import StandIn, hooks_for, start_all
from relayaudit.report import (
    FindingBrief,
    approval_text,
    render_summary,
    render_table,
    terminal_width,
)
from relayaudit.sinks import Collector, FindingsFile
from relayaudit.state import StateSink, StateStore
from relayaudit.text import clip, visible

__all__ = [
    "DEMO_LAB",
    "ROLES",
    "demo_config",
    "demo_lab",
    "demo_settings",
    "report_text",
    "run_demo",
    "run_lab",
]

DEMO_NET = "127.0.10.0/28"
DEMO_PORT = 2525
DEMO_TLS_PORT = 4650
CANARY = ("127.0.10.14", 2526)
# outside campus.test: a campus server that routes campus subdomains could deliver a canary
# under campus.test itself and fake a confirmation (config: canary.domain's rules)
CANARY_DOMAIN = "canary.iso.test"

# (last octet, port, behaviour, implicit TLS); every other address:port of the /28 is closed
DEMO_LAB: tuple[tuple[int, int, Behaviour, bool], ...] = (
    (1, DEMO_PORT, Behaviour.OPEN_RELAY, False),
    (2, DEMO_PORT, Behaviour.CLOSED, False),  # the approved campus mail server
    (3, DEMO_PORT, Behaviour.CAMPUS_SENDER, False),
    (4, DEMO_PORT, Behaviour.PERCENT_HACK, False),
    (5, DEMO_PORT, Behaviour.AUTH_REQUIRED, False),
    (5, DEMO_TLS_PORT, Behaviour.AUTH_REQUIRED, True),
    (6, DEMO_PORT, Behaviour.ACCEPT_ALL_DISCARD, False),
    (7, DEMO_PORT, Behaviour.NOT_SMTP, False),
    (8, DEMO_PORT, Behaviour.RELAY_AFTER_STARTTLS, False),
    (9, DEMO_PORT, Behaviour.ODD_FORMS_LOCAL, False),
    (10, DEMO_PORT, Behaviour.GREYLIST, False),
    (11, DEMO_PORT, Behaviour.TLS_REQUIRED, False),
    (12, DEMO_PORT, Behaviour.AUTH_NO_TLS, False),
    (13, DEMO_PORT, Behaviour.TARPIT, False),
)


# what each lab server plays, as `relayaudit lab` lists them
ROLES: dict[Behaviour, str] = {
    Behaviour.OPEN_RELAY: "open relay",
    Behaviour.CLOSED: "closed, approved (ISO-0001 campus mail hub)",
    Behaviour.CAMPUS_SENDER: "relays for senders that claim the campus domain",
    Behaviour.PERCENT_HACK: "percent-hack relay (u%d@[IP])",
    Behaviour.AUTH_REQUIRED: "AUTH required",
    Behaviour.ACCEPT_ALL_DISCARD: "trap: accepts everything, delivers nothing",
    Behaviour.NOT_SMTP: "HTTP-like: silent until spoken to, then HTTP 400",
    Behaviour.RELAY_AFTER_STARTTLS: "relays only after STARTTLS",
    Behaviour.ODD_FORMS_LOCAL: "takes odd address forms as local (a trap)",
    Behaviour.GREYLIST: "greylisting (451 at RCPT)",
    Behaviour.TLS_REQUIRED: "TLS required before MAIL",
    Behaviour.AUTH_NO_TLS: "closed, offers AUTH without TLS",
    Behaviour.TARPIT: "tarpit: accepts, never greets",
}

# what `relayaudit lab` and `relayaudit demo` suggest next (from the source tree's root)
TRY_NEXT = (
    "relayaudit check 127.0.10.1 --port 2525",
    "relayaudit check 127.0.10.3 --config config/lab.toml",
    "relayaudit check 127.0.10.1 --port 2525 --config config/lab.toml --confirm",
    "relayaudit sweep --config config/lab.toml --report lab-report.html",
)


def demo_lab(
    *,
    prefix: str = "127.0.10",
    port: int = DEMO_PORT,
    tls_port: int = DEMO_TLS_PORT,
    canary: tuple[str, int] = CANARY,
    canary_domain: str = CANARY_DOMAIN,
) -> Lab:
    """The lab of DEMO_LAB (not started): what `demo` sweeps, and config/lab.toml by hand; tests
    take the same layout on addresses (`prefix`.N) and ports of their own."""
    ports = {DEMO_PORT: port, DEMO_TLS_PORT: tls_port}
    specs = [
        ServerSpec(
            host=f"{prefix}.{octet}",
            port=ports[server_port],
            behaviour=behaviour,
            implicit_tls=tls,
            hostname=f"mx{octet}.campus.test",
        )
        for octet, server_port, behaviour, tls in DEMO_LAB
    ]
    return Lab(
        specs,
        local_domains=("campus.test",),
        campus_domains=("campus.test",),
        mx={canary_domain: canary},
    )


def demo_settings(
    *,
    prefix: str = "127.0.10",
    port: int = DEMO_PORT,
    tls_port: int = DEMO_TLS_PORT,
    canary: tuple[str, int] = CANARY,
    canary_domain: str = CANARY_DOMAIN,
) -> dict[str, Any]:
    """The config (as TOML would give it) that sweeps demo_lab() with the same arguments."""
    return {
        "scope": [f"{prefix}.0/24"],
        "targets": [f"{prefix}.0/28"],
        "exclude": [f"{canary[0]}/32"],  # the canary receiver is ours, not a target
        "ports": [port, tls_port],
        "implicit_tls_ports": [tls_port],
        "identity": {"helo_name": "relayaudit.campus.test", "contact": "iso@campus.test"},
        "relay": {
            "campus_domains": ["campus.test"],
            "external_domains": ["relay-test.example", "sender.example"],
            # the lab's greylisting server is tried again this soon, so the demo stays fast
            "greylist_retry_after": "2s",
        },
        "canary": {
            "enabled": True,
            "domain": canary_domain,
            "listen": f"{canary[0]}:{canary[1]}",
            "campus_sender": "iso@campus.test",
            "wait": "3s",
        },
        # short waits: the tarpit and the silent service would otherwise hold the demo for
        # the default 30 s greeting wait
        "timeouts": {"connect": "1s", "command": "3s", "greeting": "3s", "session": "30s"},
        "limits": {"concurrency": 32, "rate": 500, "subnet_rate": 200},
        "approved": [{"address": f"{prefix}.2", "port": port, "note": "ISO-0001 campus mail hub"}],
        # two departments run the lab; .12 is in nobody's range, so one finding names no owner
        "owners": [
            {
                "name": "Central IT",
                "ranges": [f"{prefix}.0/29"],
                "contact": "noc@campus.test",
                "queue": "noc",
            },
            {
                "name": "Chemistry",
                "ranges": [f"{prefix}.8/30", f"{prefix}.13/32"],
                "contact": "it@chem.campus.test",
                "queue": "chem-it",
            },
        ],
    }


def demo_config(findings: Path) -> Config:
    return parse_config({**demo_settings(), "output": {"findings": str(findings)}}, source="(demo)")


def report_text(
    path: Path, config: Config, collector: Collector, stats: SweepStats, sweep_id: str
) -> str:
    """The demo's report in the format of `path`'s suffix (HTML: with the services it saw)."""
    fmt = format_of(path)
    if fmt != "html":
        return render(from_sweep(collector.findings, sweep_id=sweep_id), fmt)
    services = [
        Service(v.address, v.port, v.status)
        for _, v in collector.results
        if v.status in SMTP_STATUSES
    ]
    page = page_from_sweep(
        collector.findings, sweep_id=sweep_id, stats=stats, config=config, services=services
    )
    return render_html(page)


#: the demo's state store, beside its findings (`show` and `report` read it)
STATE_FILE = "demo-state.sqlite"
#: how many runs `demo` keeps in its output directory, the newest
KEEP_RUNS = 5
_RUN_NAME = re.compile(r"\d{8}T\d{6}Z(?:-\d+)?")  # 20250102T030405Z, -2 for a second run that second


def new_run_dir(parent: Path, *, keep: int = KEEP_RUNS) -> Path:
    """`parent/<UTC time>/`, made; of the runs in `parent`, only the `keep` newest are left.

    Only directories named as a run are ever removed, and never the new one, so the paths a
    run prints stay valid."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        parent.mkdir(parents=True, exist_ok=True)
        run = parent / stamp
        for n in range(2, 1000):
            try:
                run.mkdir()
                break
            except FileExistsError:
                run = parent / f"{stamp}-{n}"
        runs = sorted(
            (d for d in parent.iterdir() if _RUN_NAME.fullmatch(d.name) and d.is_dir()),
            key=lambda d: (d.name[:16], int(d.name[17:] or 1)),
        )
        for old in runs[: max(0, len(runs) - keep)]:
            if old != run:
                shutil.rmtree(old)
    except OSError as exc:
        raise UsageError(
            f"--output-dir: cannot write into {str(parent)!r}: {exc.strerror}"
        ) from None
    return run


async def run_demo(
    output: Path | None,
    *,
    report: Path | None = None,
    hooks: bool = False,
    output_dir: Path = Path("relayaudit-demo"),
) -> int:
    if output is None:
        run = new_run_dir(output_dir)
        findings_path = run / "findings.jsonl"
        if report is None:
            report = run / "report.html"
        print(f"demo: writing into {run}/ (keeping the {KEEP_RUNS} newest runs of {output_dir}/)")
    else:
        findings_path = output
    config = demo_config(findings_path)
    lab = demo_lab()
    specs = lab.specs
    collector = Collector()
    sink = FindingsFile(findings_path)
    print(
        f"demo: starting {len(specs)} lab servers on {DEMO_NET} and the canary receiver on {CANARY[0]}:{CANARY[1]}"
    )
    for octet, port, behaviour, tls in DEMO_LAB:
        print(f"  127.0.10.{octet}:{port}  {behaviour.value}{' (implicit TLS)' if tls else ''}")
    async with contextlib.AsyncExitStack() as started:
        try:
            await started.enter_async_context(lab)
            canary = await started.enter_async_context(
                CanaryReceiver(*CANARY, domain=CANARY_DOMAIN)
            )
        except OSError as exc:  # the lab's fixed addresses: taken, or not on this host
            if output is None:  # no run to keep: leave no empty run behind
                with contextlib.suppress(OSError):
                    findings_path.parent.rmdir()
            raise TemporaryError(f"demo: {exc.strerror or exc}") from None
        desk = (
            await started.enter_async_context(TicketDesks(findings_path.parent)) if hooks else None
        )
        # a state store beside the findings, so `show` and `report` can read this run
        store = desk.store if desk is not None else StateStore(findings_path.parent / STATE_FILE)
        assert store is not None
        if desk is None:
            store.open()
            started.callback(store.close)
        print(
            "demo: sweeping with confirmation mode on (canary messages go only to the receiver above)\n"
        )
        try:
            sinks: list[Sink] = [collector, sink]
            if desk is not None:
                sinks.append(desk.begin(config))
            else:
                record = store.begin_sweep(
                    shard="0/1", config_fingerprint=config_fingerprint(config), total=len(DEMO_LAB)
                )
                sinks.append(StateSink(store, record.id))
            stats = await sweep(config, sinks=sinks, canary=canary)
        finally:
            sink.close()
        if desk is not None:
            await desk.deliver(stats)
        else:
            store.complete_sweep(record.id, stats)
    width = terminal_width()
    lead = " " * 50  # the summary column: 22 + 1 + 26 + 1
    room = None if width is None else max(24, width - len(lead))
    print(f"{'address:port':22} {'status':26} summary")
    for result, verdict in sorted(
        collector.results, key=lambda rv: (int(rv[0].address.rsplit(".", 1)[1]), rv[0].port)
    ):
        if verdict.status.value in {"closed"}:
            continue
        print(
            f"{endpoint(result.address, result.port):22} {verdict.status.value:26} "
            f"{clip(visible(verdict.summary), room)}"
        )
        approved = config.is_approved(ipaddress.ip_address(result.address), result.port)
        if approved is not None:
            print(lead + clip(approval_text(approved.note), room))
    print("\nfindings, most severe first:")
    briefs = map(FindingBrief.of, collector.findings)
    print("\n".join(render_table(briefs, width=width, owners=True)))
    print()
    print(render_summary(stats))
    print(
        f"\nlab relayed {len(lab.delivered)} message(s) onward; canary messages delivered: "
        f"{sum(1 for r, _ in collector.results if r.confirmation and r.confirmation.delivered)}"
    )
    print(f"findings as JSON lines: {findings_path}")
    if report is not None:
        text = report_text(report, config, collector, stats, sink.sweep_id)
        try:
            await asyncio.to_thread(write_text, report, text)
        except OSError as exc:
            raise UsageError(f"--report: cannot write {str(report)!r}: {exc.strerror}") from None
        print(f"report: {report}")
    if desk is not None:
        print("\n" + "\n".join(desk.lines))
    print("\n" + "\n".join(next_commands(findings_path.parent / STATE_FILE, collector)))
    print("demo: lab stopped", file=sys.stderr)
    return 0


def next_commands(state: Path, collector: Collector) -> list[str]:
    """What to try after the demo, each with the arguments that work on this run."""
    relay = next((f for f in collector.findings if f.kind.is_relay), None)
    shown = relay.id if relay is not None else "ID"
    return [
        "try next (relayaudit is .venv/bin/relayaudit in a source tree; README, \"Try it by hand\"):",
        "  relayaudit lab                                  "
        "the same servers, left running (Ctrl-C stops them)",
        "  relayaudit check 127.0.10.1 --port 2525         "
        "one host, its whole conversation (while the lab runs)",
        f"  relayaudit show {shown} --state {state}",
        f"  relayaudit report --state {state} --format md",
    ]


async def run_lab(duration: float | None) -> int:
    """`relayaudit lab`: the demo's lab (demo_lab(), with the canary domain's mail routed to
    config/lab.toml's canary address but no canary receiver of its own: `sweep`, `run` and
    `check --confirm` bind that address themselves) until Ctrl-C, SIGTERM or `duration` s."""
    lab = demo_lab()
    print(f"lab: {len(lab.specs)} SMTP servers on loopback (relayaudit/demo.py, DEMO_LAB):")
    for octet, port, behaviour, tls in DEMO_LAB:
        where = f"127.0.10.{octet}:{port}"
        print(f"  {where:18} {ROLES[behaviour]}{' (implicit TLS)' if tls else ''}")
    print(
        f"  mail for {CANARY_DOMAIN} goes to {CANARY[0]}:{CANARY[1]}, config/lab.toml's "
        "canary.listen: nothing listens there until a command that confirms binds it"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            await lab.start()
        except OSError as exc:  # the lab's fixed addresses: taken, or not on this host
            raise TemporaryError(f"lab: {exc.strerror or exc}") from None
        try:
            print("\ntry, from the source tree's root (one command at a time may use the canary")
            print(f"address {CANARY[0]}:{CANARY[1]}: sweep, run and check --confirm bind it):")
            for command in TRY_NEXT:
                print(f"  {command}")
            until = f"for {duration:g} s" if duration is not None else "until Ctrl-C or SIGTERM"
            print(f"\nlab ready ({until})", flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(duration):
                    await stop.wait()
        finally:
            await lab.stop()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print("lab stopped", flush=True)
    return 0


class TicketDesks:
    """`demo --hooks`: loopback stand-ins of Jira, TheHive, ServiceNow and a chat, sent the
    sweep's alerts with the templates relayaudit ships, by the daemon's own dispatcher."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.apis: list[StandIn] = []
        self.store: StateStore | None = None
        self.alerts: AlertsConfig | None = None
        self.sweep_id = ""
        self.lines: list[str] = []  # what deliver() did, for after the lab is stopped

    async def __aenter__(self) -> TicketDesks:
        self.apis = await start_all()
        data = tomllib.loads('[alerts]\nbackoff_initial = "0.2s"\n' + hooks_for(self.apis))
        self.alerts = parse_config(
            {"scope": ["127.0.0.0/8"], "targets": [DEMO_NET], **data}, source="(demo --hooks)"
        ).alerts
        check_templates(self.alerts)
        self.store = StateStore(self.directory / STATE_FILE)
        self.store.open()
        self.store.set_channels(channel_names(self.alerts))
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.store is not None:
            self.store.close()
        for api in self.apis:
            await api.stop()

    def begin(self, config: Config) -> StateSink:
        assert self.store is not None
        record = self.store.begin_sweep(
            shard="0/1", config_fingerprint=config_fingerprint(config), total=len(DEMO_LAB)
        )
        self.sweep_id = record.id
        return StateSink(self.store, record.id)

    async def deliver(self, stats: SweepStats) -> None:
        """Every alert to every stand-in, retries included, for at most 30 s."""
        assert self.store is not None and self.alerts is not None
        self.store.complete_sweep(self.sweep_id, stats)
        dispatcher = Dispatcher(self.store, self.alerts)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while self.store.outbox_counts()["pending"]:
                    if await dispatcher.run_once() == 0:
                        await asyncio.sleep(0.1)
        self.lines = self.summary()

    def summary(self) -> list[str]:
        assert self.store is not None
        counts = self.store.outbox_counts()
        lines = [
            f"alert hooks (--hooks): {counts['sent']} deliveries sent, {counts['pending']} "
            f"pending, {counts['dead']} dead, to loopback stand-ins of these APIs, with the "
            "templates relayaudit ships:"
        ]
        for api in self.apis:
            made = [t for t in api.tickets.values()]
            what = (
                f"{len(made)} ticket(s)"
                if made
                else f"{len(getattr(api, 'messages', []))} message(s)"
            )
            lines.append(f"  {api.name:11} {api.url:24} {what}, {len(api.requests)} request(s)")
            for ticket in made[:3]:
                title = (
                    ticket.fields.get("summary")
                    or ticket.fields.get("title")
                    or ticket.fields.get("short_description")
                    or ""
                )
                lines.append(f"    {ticket.id}: {clip(visible(str(title)), 70)} [{ticket.status}]")
            if len(made) > 3:
                lines.append(f"    ... and {len(made) - 3} more")
        return lines
